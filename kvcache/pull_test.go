package kvcache

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// pullManager returns a small manager of 4-token blocks on a host device, closed when t ends.
func pullManager(t *testing.T) *Manager {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	m, err := New(dev, Config{Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4,
		PageSize: 32 << 10, Capacity: 64 * (32 << 10), NoBackground: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// A subscriber's Read never waits for the manager's lock: while an operation holds it, Read
// returns what was published, and the events held back for it reach the subscription once the
// lock is free (the retry), with Ready fired for the next Read. Nothing is lost or reordered.
func TestPullDoesNotWaitForTheLock(t *testing.T) {
	m := pullManager(t)
	sub, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	var want []prefix.Key
	for s := range 3 { // held back for the subscriber's next Read
		ids := []prefix.Token{prefix.Token(10 * s), 1, 2, 3}
		_, err := m.AppendTokenIDs(SeqID(s), ids, nil)
		require.NoError(t, err)
		want = append(want, prefix.Keys(nil, prefix.Namespace{}, 4, ids)...)
	}
	require.True(t, m.holding.Load(), "events are held back for the subscriber")
	<-sub.Ready() // the subscriber was told of them

	m.mu.Lock() // an operation under way
	read := make(chan []prefix.Event)
	go func() { read <- sub.Read(nil) }()
	var first []prefix.Event
	select {
	case first = <-read:
	case <-time.After(10 * time.Second):
		m.mu.Unlock()
		t.Fatal("Read waited for the manager's lock")
	}
	m.mu.Unlock()
	require.Empty(t, first, "the events held back wait for the lock")
	select {
	case <-sub.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("the events held back never reached the subscription")
	}
	var got []prefix.Key
	for _, ev := range sub.Read(nil) {
		require.Equal(t, prefix.BlockStored, ev.Kind)
		got = append(got, ev.Keys...)
	}
	assert.Equal(t, want, got)
	assert.False(t, m.holding.Load())
}

// A pull that found the lock taken is served by the operation holding it: its publish hands
// over every event held back, so the reader need not wait for the retry, which then stops.
func TestFailedPullIsServedByTheLockHolder(t *testing.T) {
	m := pullManager(t)
	sub, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	var want []prefix.Key
	for s := range 3 {
		ids := []prefix.Token{prefix.Token(10 * s), 1, 2, 3}
		_, err := m.AppendTokenIDs(SeqID(s), ids, nil)
		require.NoError(t, err)
		want = append(want, prefix.Keys(nil, prefix.Namespace{}, 4, ids)...)
	}
	<-sub.Ready()

	m.mu.Lock() // an operation under way
	assert.Empty(t, sub.Read(nil), "the pull found the lock taken")
	require.True(t, m.pullArmed.Load(), "the pull waits")
	m.publish() // the operation ends
	assert.False(t, m.pullArmed.Load(), "its publish served the pull")
	assert.Zero(t, m.pending.Len())
	m.mu.Unlock()

	var got []prefix.Key
	for _, ev := range sub.Read(nil) {
		got = append(got, ev.Keys...)
	}
	assert.Equal(t, want, got)
}

// A subscription gets the events of operations after Subscribe, not those held back for the
// subscribers before it, and the first event after it reaches it and signals its Ready: an
// operation that adds nothing to events already held does not tell the subscribers again, so a
// new one must not depend on that.
func TestSubscribeGetsLaterEvents(t *testing.T) {
	m := pullManager(t)
	first, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	cache := func(s int) prefix.Key { // an append that caches a block, and one that adds no event
		ids := []prefix.Token{prefix.Token(10 * s), 1, 2, 3}
		_, err := m.AppendTokenIDs(SeqID(s), ids, nil)
		require.NoError(t, err)
		_, err = m.AppendTokenIDs(SeqID(s), ids[:1], nil)
		require.NoError(t, err)
		return prefix.Keys(nil, prefix.Namespace{}, 4, ids)[0]
	}
	k0 := cache(0)
	require.True(t, m.holding.Load(), "the event is held back for the first subscriber")
	held := m.pending.Len()
	_, err = m.Subscribe(0)
	var ce *CountError
	require.ErrorAs(t, err, &ce)
	require.ErrorIs(t, err, ErrInvalidArgument)
	require.Equal(t, held, m.pending.Len(), "a refused Subscribe hands nothing over")
	require.True(t, m.holding.Load())
	second, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	require.False(t, signalled(second.Ready()), "the second subscription was told of events from before it")
	k1 := cache(1)
	require.True(t, signalled(second.Ready()), "the event after Subscribe did not signal the new subscription")
	keys := func(evs []prefix.Event) (ks []prefix.Key) {
		for _, ev := range evs {
			require.Equal(t, prefix.BlockStored, ev.Kind)
			ks = append(ks, ev.Keys...)
		}
		return ks
	}
	assert.Equal(t, []prefix.Key{k0, k1}, keys(first.Read(nil)))
	assert.Equal(t, []prefix.Key{k1}, keys(second.Read(nil)))
}

// A subscriber that reads on every Ready gets every event of the manager's operations, even
// after a Read whose pull queued the held events behind others it had not taken yet (a batch
// past holdEvents, or what another Subscribe handed over): the events held after that Read
// signal its Ready, and do not sit in the manager unread.
func TestReaderIsToldAfterPullBehindQueued(t *testing.T) {
	for _, tc := range []struct {
		name  string
		queue func(t *testing.T, m *Manager, cache func(int) prefix.Key) []prefix.Key // queues events on sub, holds more
	}{
		{"past holdEvents", func(_ *testing.T, _ *Manager, cache func(int) prefix.Key) (ks []prefix.Key) {
			for s := range holdEvents + 1 { // the holdEvents-th publish hands all to the queue
				ks = append(ks, cache(s))
			}
			return ks
		}},
		{"another Subscribe", func(t *testing.T, m *Manager, cache func(int) prefix.Key) []prefix.Key {
			k0 := cache(0)
			_, err := m.Subscribe(1 << 10) // hands k0, held, to the first one's queue
			require.NoError(t, err)
			return []prefix.Key{k0, cache(1)}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
			require.NoError(t, err)
			defer func() { require.NoError(t, dev.Close()) }()
			m, err := New(dev, Config{Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4,
				PageSize: 32 << 10, Capacity: 1024 * (32 << 10), NoBackground: true})
			require.NoError(t, err)
			defer func() { require.NoError(t, m.Close()) }()
			sub, err := m.Subscribe(1 << 12)
			require.NoError(t, err)
			cache := func(s int) prefix.Key { // an append that caches one block
				ids := []prefix.Token{prefix.Token(10 * s), 1, 2, 3}
				_, err := m.AppendTokenIDs(SeqID(s), ids, nil)
				require.NoError(t, err)
				return prefix.Keys(nil, prefix.Namespace{}, 4, ids)[0]
			}
			keys := func(evs []prefix.Event) (ks []prefix.Key) {
				for _, ev := range evs {
					ks = append(ks, ev.Keys...)
				}
				return ks
			}
			want := tc.queue(t, m, cache)
			require.True(t, m.holding.Load(), "the last event is held")
			require.True(t, signalled(sub.Ready()), "the subscriber was not told of the queued events")
			require.Equal(t, want, keys(sub.Read(nil)), "the held event pulled in behind the queued")
			k := cache(5000)
			require.True(t, signalled(sub.Ready()), "an event is held for the subscriber and its Ready was not signalled")
			assert.Equal(t, []prefix.Key{k}, keys(sub.Read(nil)))
		})
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
