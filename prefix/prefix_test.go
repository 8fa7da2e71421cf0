package prefix

import (
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// The key is exactly SHA-256(parent || tokens as little-endian uint32), computed here without
// the package's code, so a router can compute the same keys.
func TestKeyFormula(t *testing.T) {
	root := Root(Namespace{}, 4)
	tokens := []Token{1, 2, 3, -1}
	buf := append([]byte(nil), root[:]...)
	for _, tk := range tokens {
		buf = binary.LittleEndian.AppendUint32(buf, uint32(tk))
	}
	var x Hasher
	assert.Equal(t, Key(sha256.Sum256(buf)), x.Next(root, tokens))
	native := littleEndian // both ways of writing the ids, whatever this machine is
	littleEndian = !native
	assert.Equal(t, Key(sha256.Sum256(buf)), x.Next(root, tokens))
	littleEndian = native

	rb := []byte(rootTag)
	for _, v := range []uint64{7, 3} {
		rb = binary.LittleEndian.AppendUint64(rb, v)
	}
	rb = append(rb, "abc"...)
	rb = binary.LittleEndian.AppendUint64(rb, 16)
	assert.Equal(t, Key(sha256.Sum256(rb)), Root(Namespace{Adapter: 7, Salt: "abc"}, 16))
	assert.Len(t, root.String(), 64)
}

// Namespaces and block sizes separate keys; equal prefixes give equal keys.
func TestKeysChain(t *testing.T) {
	tokens := make([]Token, 10)
	for i := range tokens {
		tokens[i] = Token(i * 7)
	}
	a := Keys(nil, Namespace{}, 4, tokens)
	require.Len(t, a, 2, "two full blocks of 4 in 10 tokens")
	b := Keys(nil, Namespace{}, 4, tokens[:8])
	assert.Equal(t, a, b)
	var x Hasher
	assert.Equal(t, x.Next(a[0], tokens[4:8]), a[1], "each key chains from its parent")
	for _, ns := range []Namespace{{Adapter: 1}, {Salt: "tenant-a"}, {Salt: "tenant-b"}} {
		assert.NotEqual(t, a[0], Keys(nil, ns, 4, tokens)[0], "%+v", ns)
	}
	assert.NotEqual(t, a[0], Keys(nil, Namespace{}, 2, tokens)[1], "block size is part of the root")
	assert.Empty(t, Keys(nil, Namespace{}, 0, tokens))
	assert.Empty(t, Keys(nil, Namespace{}, -3, tokens))
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = x.Next(a[0], tokens[:4]) }), "a warm Hasher allocates nothing")
}

func TestFeed(t *testing.T) {
	var f Feed
	assert.False(t, f.Active())
	f.Publish(Event{Kind: BlockStored}) // nobody listens: nothing happens
	_, err := f.Subscribe(0)
	require.ErrorIs(t, err, errdefs.ErrInvalidArgument)
	require.EqualError(t, err, "prefix: subscribe: invalid argument: queue length 0 is below 1")
	_, err = f.Subscribe(MaxQueue + 1)
	require.EqualError(t, err, "prefix: subscribe: invalid argument: queue length 1073741825 exceeds 1073741824")
	assert.False(t, f.Active(), "a refused subscription adds none")
	s, err := f.Subscribe(3)
	require.NoError(t, err)
	assert.True(t, f.Active())
	f.Publish(Event{Kind: BlockStored, Keys: []Key{{1}}}, Event{Kind: BlockRemoved, Keys: []Key{{1}}})
	<-s.Ready()
	got := s.Read(nil)
	require.Len(t, got, 2)
	assert.Equal(t, BlockStored, got[0].Kind)
	assert.Equal(t, BlockRemoved, got[1].Kind)
	assert.Empty(t, s.Read(nil))

	// A reader that falls behind loses the queue, and learns how much.
	f.Publish(Event{Kind: BlockStored}, Event{Kind: BlockStored})
	f.Publish(Event{Kind: BlockStored}, Event{Kind: BlockStored}) // 4 > 3: dropped with the 2 queued
	f.Publish(Event{Kind: AllBlocksCleared})
	got = s.Read(nil)
	require.Len(t, got, 2)
	assert.Equal(t, EventsLost, got[0].Kind)
	assert.EqualValues(t, 4, got[0].Lost)
	assert.Equal(t, AllBlocksCleared, got[1].Kind)

	require.NoError(t, s.Close())
	require.ErrorIs(t, s.Close(), errdefs.ErrClosed)
	for range s.Ready() { // a signal may still be buffered; then the channel is closed
	}
	assert.False(t, f.Active())
	f.Publish(Event{Kind: BlockStored}) // a subscriber gone: no effect
	assert.Empty(t, s.Read(nil))
	assert.Equal(t, "BlockRemoved", BlockRemoved.String())

	var nilSub *Subscription
	assert.Empty(t, nilSub.Read(nil))
	require.ErrorIs(t, nilSub.Close(), errdefs.ErrInvalidArgument)
	s2, _ := f.Subscribe(1)
	f.Close()
	for range s2.Ready() {
	}
}

// A writer that hands its journals over (HandJournal) and a reader that reads them (Take) move
// whole arrays: events keep their order, a loss is still reported first, and a warm pair
// allocates only each batch's keys.
func TestHandJournalAndTake(t *testing.T) {
	var f Feed
	s, err := f.Subscribe(4)
	require.NoError(t, err)
	ev := func(b byte) Event { return Event{Kind: BlockStored, Keys: []Key{{b}}} }
	var w Journal
	write := func(bs ...byte) {
		for _, b := range bs {
			e := ev(b)
			w.Append(&e)
		}
	}
	keys := func(evs []Event) []byte {
		var out []byte
		for _, e := range evs {
			if e.Kind == EventsLost {
				out = append(out, byte(100+e.Lost))
				continue
			}
			out = append(out, e.Keys[0][0])
		}
		return out
	}

	// The queue has no array yet: the events are copied, and the writer keeps its array, emptied.
	write(1, 2)
	mine := cap(w.b)
	f.HandJournal(&w)
	assert.Zero(t, w.Len())
	assert.Equal(t, mine, cap(w.b))
	got := s.Take(nil)
	assert.Equal(t, []byte{1, 2}, keys(got))

	// After a read the queue has the array that read emptied: the next batch takes the writer's
	// array whole, and the writer gets the queue's.
	_ = s.Take(got)
	queue := cap(s.queue.b)
	require.NotZero(t, queue)
	write(3)
	f.HandJournal(&w)
	assert.Equal(t, queue, cap(w.b), "the queue's array came to the writer")
	write(4) // queued behind 3, by copy
	f.HandJournal(&w)
	got2 := s.Take(nil)
	assert.Equal(t, []byte{3, 4}, keys(got2))

	// Beyond the bound the queue is lost, and Take reports it first.
	write(5, 6, 7)
	f.HandJournal(&w)
	write(8, 9)
	f.HandJournal(&w)
	write(10)
	f.HandJournal(&w)
	assert.Equal(t, []byte{105, 10}, keys(s.Take(nil)))

	// Two subscriptions each get a copy, and the writer keeps its array.
	s2, err := f.Subscribe(4)
	require.NoError(t, err)
	write(11)
	mine = cap(w.b)
	f.HandJournal(&w)
	assert.Equal(t, mine, cap(w.b))
	assert.Equal(t, []byte{11}, keys(s.Take(nil)))
	assert.Equal(t, []byte{11}, keys(s2.Take(nil)))
	require.NoError(t, s2.Close())

	// Warm, a writer and a reader that hand batches back and forth allocate only the array of
	// each batch's keys.
	var r []Event
	for range 3 {
		write(12)
		f.HandJournal(&w)
		r = s.Take(r)
	}
	assert.Equal(t, 1.0, testing.AllocsPerRun(100, func() {
		write(13)
		f.HandJournal(&w)
		r = s.Take(r)
	}))
	assert.Equal(t, []byte{13}, keys(r))

	require.NoError(t, s.Close())
	write(14)
	f.HandJournal(&w)
	assert.Zero(t, w.Len(), "nobody listens: the events go nowhere")
	assert.Empty(t, s.Take(nil))
	var nilSub *Subscription
	assert.Empty(t, nilSub.Take(nil))
	var nilFeed *Feed
	write(15)
	nilFeed.HandJournal(&w)
	assert.Zero(t, w.Len())
	f.HandJournal(nil) // no journal: nothing happens
}

// BenchmarkFeed times a writer's batch of 256 one-block events reaching a reader: copied twice
// (Publish, then Read) or written as records and handed over whole (Journal.Append,
// HandJournal, then Take). ns/event is per event.
func BenchmarkFeed(b *testing.B) {
	const batch = 256
	keys := make([]Key, batch)
	tokens := make([]Token, 16*batch)
	fill := func(evs []Event) []Event {
		for i := range batch {
			evs = append(evs, Event{Kind: BlockStored, Keys: keys[i : i+1], Tokens: tokens[16*i : 16*i+16], BlockSize: 16,
				Medium: MediumGPU})
		}
		return evs
	}
	b.Run("copied", func(b *testing.B) {
		var f Feed
		s, _ := f.Subscribe(1 << 16)
		w, r := make([]Event, 0, batch), []Event(nil)
		b.ReportAllocs()
		for b.Loop() {
			w = fill(w)
			f.Publish(w...)
			clear(w)
			w = w[:0]
			r = s.Read(r[:0])
			clear(r)
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/event")
	})
	b.Run("handed", func(b *testing.B) {
		var f Feed
		s, _ := f.Subscribe(1 << 16)
		w, r, j := make([]Event, 0, batch), []Event(nil), Journal{}
		b.ReportAllocs()
		for b.Loop() {
			w = fill(w[:0])
			for i := range w {
				j.Append(&w[i])
			}
			f.HandJournal(&j)
			r = s.Take(r)
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/event")
	})
}

// A reader that reads on every Ready is told of every batch a writer holds for it (Feed.Hold),
// even when its last Read's pull queued events behind others it had not yet taken: that push
// found the queue not empty and sent no signal of its own, yet left the subscription marked as
// having unread events, so that Hold told it nothing.
func TestHoldTellsAfterPullIntoQueue(t *testing.T) {
	var f Feed
	var held []Event
	f.SetPull(func() { // a writer's pull: it publishes what it held back
		f.Publish(held...)
		held = nil
	})
	s, err := f.Subscribe(16)
	require.NoError(t, err)
	ev := func(b byte) Event { return Event{Kind: BlockStored, Keys: []Key{{b}}} }
	f.Publish(ev(1))
	held = append(held, ev(2))
	require.True(t, f.Hold())
	require.True(t, signalled(s.Ready()), "the reader was not told of the queued event")
	got := s.Read(nil) // 1 was queued, 2 pulled in behind it
	require.Len(t, got, 2)
	assert.Equal(t, Key{2}, got[1].Keys[0])
	held = append(held, ev(3))
	require.True(t, f.Hold())
	require.True(t, signalled(s.Ready()), "an event is held for the reader and Ready was not signalled")
	got = s.Read(nil)
	require.Len(t, got, 1)
	assert.Equal(t, Key{3}, got[0].Keys[0])
}

// A Subscription that Subscribe did not make (the zero value) is refused as a nil one is: its
// Ready is closed, so that a reader ranging over it ends instead of waiting forever, and Read,
// Take and Close report it.
func TestZeroSubscription(t *testing.T) {
	for name, s := range map[string]*Subscription{"nil": nil, "zero": {}} {
		ready := s.Ready()
		select {
		case _, ok := <-ready:
			require.False(t, ok, "%s: Ready receives only by being closed", name)
		default:
			t.Fatalf("%s: Ready is neither closed nor signalled: a reader waits forever", name)
		}
		assert.Empty(t, s.Read(nil), name)
		assert.Empty(t, s.Take(nil), name)
		require.ErrorIs(t, s.Close(), errdefs.ErrInvalidArgument, name)
	}
}

// signalled reports whether ready (a subscription's Ready) holds a signal, taking it, without
// waiting.
func signalled(ready <-chan struct{}) bool {
	select {
	case <-ready:
		return true
	default:
		return false
	}
}
