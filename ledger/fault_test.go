package ledger_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/ledger"
)

// gated is a holder whose Reclaim says it was asked, then waits for release before it gives
// nothing back.
type gated struct {
	holder
	asked, release chan struct{}
}

func (h *gated) Reclaim(need uint64, compact, wait bool) uint64 {
	h.asked <- struct{}{}
	<-h.release
	return 0
}

func (h *gated) TryReclaim(need uint64, compact bool) (uint64, bool) {
	return h.Reclaim(need, compact, false), false
}

// Another process that cuts the ledger's file short (its pages then raise SIGBUS) kills no
// one: a member waiting for an answer in its mailbox, the member answering it and every later
// call get a *FaultError with the file's size, and Close still releases everything.
func TestFileCutShort(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 16*unit)
	other := open(t, path, 0) // as another process's handle: asked through the mailbox
	g := &gated{asked: make(chan struct{}, 1), release: make(chan struct{})}
	b, err := other.Join("b", g, ledger.JoinOptions{})
	require.NoError(t, err)
	require.NoError(t, b.Acquire(16*unit, false))
	a, _ := join(t, l, "a")

	asked := make(chan error, 1)
	go func() { asked <- a.Acquire(unit, false) }() // the limit is spent: a asks b
	<-g.asked                                       // b's responder serves the request
	require.NoError(t, os.Truncate(path, 0))
	close(g.release) // b's answer faults; so does a's next look for it

	err = <-asked
	var fe *ledger.FaultError
	require.ErrorAs(t, err, &fe)
	require.ErrorIs(t, err, ledger.ErrDamaged)
	require.Equal(t, ledger.FaultError{Op: "acquire", Path: path, Size: 0, Want: fe.Want}, *fe)
	require.Positive(t, fe.Want)

	for _, err := range []error{a.TryAcquire(1), a.Acquire(1, true), l.Check()} {
		require.ErrorIs(t, err, ledger.ErrDamaged)
	}
	_, err = l.Snapshot()
	require.ErrorIs(t, err, ledger.ErrDamaged)
	_, err = l.SetLimit(unit)
	require.ErrorIs(t, err, ledger.ErrDamaged)
	_, err = l.DropCache("")
	require.ErrorIs(t, err, ledger.ErrDamaged)
	_, err = l.Join("c", &holder{}, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrDamaged)
	require.Zero(t, l.Limit())
	require.Zero(t, l.Used())
	require.Zero(t, a.Used())
	require.Zero(t, a.Headroom())
	a.Release(unit)
	a.Leave()
	require.NoError(t, other.Close()) // waits for b's responder, which ended at its fault
	require.NoError(t, l.Close())

	l, err = ledger.Open(path, ledger.Options{Limit: unit}) // an empty file: made a ledger again
	require.NoError(t, err)
	require.NoError(t, l.Close())
}

// A handle that met a file cut short stays damaged when another process makes the file a
// ledger again: its member's slot is free in the new ledger, so the bytes it took would be
// counted by no one.
func TestDamagedAfterRemade(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 16*unit)
	a, _ := join(t, l, "a")
	require.NoError(t, os.Truncate(path, 0))
	require.ErrorIs(t, a.TryAcquire(unit), ledger.ErrDamaged)

	other, err := ledger.Open(path, ledger.Options{Limit: 16 * unit}) // an empty file: a new ledger
	require.NoError(t, err)
	require.ErrorIs(t, a.TryAcquire(unit), ledger.ErrDamaged)
	require.ErrorIs(t, a.Acquire(unit, false), ledger.ErrDamaged)
	_, err = l.Join("b", &holder{}, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrDamaged)
	_, err = l.Snapshot()
	require.ErrorIs(t, err, ledger.ErrDamaged)
	require.Zero(t, a.Used())
	require.NoError(t, other.Check())
	require.Zero(t, other.Used())

	c, err := other.Join("c", &holder{}, ledger.JoinOptions{}) // not in a's slot, whose liveness lock a holds
	require.NoError(t, err)
	require.NoError(t, c.TryAcquire(unit))
	a.Leave() // clears only its own slot, free in the new ledger
	require.NoError(t, l.Close())
	s, err := other.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 1)
	require.Equal(t, "c", s.Members[0].Name)
	require.Equal(t, uint64(unit), s.Members[0].Mapped)
	require.NoError(t, other.Check())
	d, err := other.Join("a", &holder{}, ledger.JoinOptions{}) // the name is free again
	require.NoError(t, err)
	d.Leave()
	c.Leave()
	require.NoError(t, other.Close())
}
