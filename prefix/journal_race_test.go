package prefix

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// stressEvent is the i-th event of the stress tests: its fields all follow from i.
func stressEvent(i int) Event {
	ev := Event{Kind: BlockStored, Keys: []Key{{byte(i), byte(i >> 8), byte(i >> 16)}}, BlockSize: i % 7, Medium: MediumGPU}
	if i%3 == 0 {
		ev.Kind, ev.BlockSize = BlockRemoved, 0
		return ev
	}
	ev.Tokens = make([]Token, i%5+1)
	for j := range ev.Tokens {
		ev.Tokens[j] = Token(i*10 + j)
	}
	return ev
}

// A writer that holds its events back for the reader's pull, as a manager does, and a reader
// that takes them on another goroutine: every event arrives once, in order, intact.
func TestJournalPullStress(t *testing.T) {
	const n = 20000
	var (
		f              Feed
		mu, pubMu      sync.Mutex
		pending, spare Journal
	)
	s, err := f.Subscribe(1 << 20)
	require.NoError(t, err)
	f.SetPull(func() {
		if !mu.TryLock() {
			return
		}
		pubMu.Lock()
		held := pending
		pending, spare = spare, Journal{}
		mu.Unlock()
		f.HandJournal(&held)
		spare = held
		pubMu.Unlock()
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; i++ {
			mu.Lock()
			ev := stressEvent(i)
			pending.Append(&ev)
			bad := Event{Kind: BlockStored, Keys: []Key{{0xff}}, Tokens: []Token{-1}}
			pending.Append(&bad)
			pending.DropUnsealed()
			pending.Append(&ev)
			pending.DropUnsealed()
			pending.Append(&ev)
			pending.Seal()
			if i%64 == 63 {
				pubMu.Lock()
				f.HandJournal(&pending)
				pubMu.Unlock()
			}
			mu.Unlock()
		}
		mu.Lock()
		pubMu.Lock()
		f.HandJournal(&pending)
		pubMu.Unlock()
		mu.Unlock()
	}()
	var got []Event
	var buf []Event
	finished := false
	for !finished {
		select {
		case <-done:
			finished = true
		case <-s.Ready():
		}
		buf = s.Take(buf)
		for _, ev := range buf {
			got = append(got, ev)
		}
	}
	got = append(got, s.Read(nil)...)
	require.Len(t, got, n)
	for i := range got {
		require.Equal(t, stressEvent(i), got[i], "event %d", i)
	}
}
