package ledger

import (
	"math"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// nopHolder gives nothing back and has no cache.
type nopHolder struct{}

func (nopHolder) Reclaim(need uint64, compact, wait bool) uint64 { return 0 }
func (nopHolder) DropCache()                                     {}
func (nopHolder) Usage() Usage                                   { return Usage{} }

// Byte counts of a corrupted ledger that add up past MaxUint64 saturate: the members hold
// everything, and nobody is granted more, rather than the sum wrapping to a little.
func TestCorruptCountsSaturate(t *testing.T) {
	l, err := Open(filepath.Join(t.TempDir(), "l"), Options{Limit: 1 << 20})
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	var ms []*Member
	for _, name := range []string{"a", "b", "c"} {
		m, err := l.Join(name, nopHolder{}, JoinOptions{})
		require.NoError(t, err)
		ms = append(ms, m)
	}
	atomic.StoreUint64(l.s64(ms[0].slot, sMapped), 1<<63) // as a stray writer might leave them
	atomic.StoreUint64(l.s64(ms[1].slot, sMapped), 1<<63)

	require.Equal(t, uint64(math.MaxUint64), l.Used())
	s, err := l.Snapshot()
	require.NoError(t, err)
	require.Equal(t, uint64(math.MaxUint64), s.Used)
	require.Zero(t, ms[2].Headroom())
	var ce *CapacityError
	require.ErrorAs(t, ms[2].TryAcquire(4096), &ce, "the limit is spent many times over")
	require.Equal(t, CapacityError{Need: 4096, Free: 0}, *ce)
	require.ErrorAs(t, ms[2].Acquire(4096, true), &ce)
	require.Zero(t, ms[2].Used(), "a refused acquisition takes nothing")
	r, err := l.SetLimit(1 << 20)
	require.NoError(t, err)
	require.Equal(t, LimitReport{Limit: 1 << 20, Used: math.MaxUint64, Shortfall: math.MaxUint64 - 1<<20}, r)
}

// The member's goroutines meet a file cut short as errors and end, rather than fault: the
// usage publisher at its next publish, the responder at its next request.
func TestGoroutinesSurviveCutFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l, err := Open(path, Options{Limit: 1 << 20})
	require.NoError(t, err)
	m, err := l.Join("a", nopHolder{}, JoinOptions{})
	require.NoError(t, err)
	require.NoError(t, os.Truncate(path, 0))

	g := protect("publish usage")
	var fe *FaultError
	require.ErrorAs(t, m.publish(g), &fe)
	_, err = m.serveNext(g, 0) // its first load faults
	require.ErrorAs(t, err, &fe)
	unprotect(g)
	require.NoError(t, l.Close())
}

// A file cut short right after Join filled its slot fails the Join, or lets it succeed, but
// never leaves a member half registered: Close must not wait for a responder never started.
func TestJoinCutAfterFill(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l, err := Open(path, Options{Limit: 1 << 20})
	require.NoError(t, err)
	joinFilled = func() { require.NoError(t, os.Truncate(path, 0)) }
	defer func() { joinFilled = nil }()
	m, _ := l.Join("a", nopHolder{}, JoinOptions{})
	joinFilled = nil
	closed := make(chan error, 1)
	go func() {
		if m != nil {
			m.Leave()
		}
		closed <- l.Close()
	}()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs: a responder of the failed Join was counted but never started")
	}
}
