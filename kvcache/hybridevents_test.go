package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// A Hybrid's KV events carry their layer group, as vLLM's do for hybrid models: every block
// stored or removed names its group's index, a stored one the group's kind and, for a sliding
// window, the window; each group keys its own blocks in its own block size.
func TestHybridEventsCarryTheirGroup(t *testing.T) {
	g := smallHybrid(true)
	h := newHybrid(t, hostDevice(t, 64<<10), g)
	sub, err := h.Subscribe(1 << 12)
	require.NoError(t, err)
	ids := make([]prefix.Token, 200)
	for i := range ids {
		ids[i] = prefix.Token(i + 1)
	}
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokenIDs(1, ids, dst)
	require.NoError(t, err)
	require.NoError(t, h.FreeSequence(1))
	_, err = h.AppendTokenIDs(2, ids[:64], dst)
	require.NoError(t, err)

	kinds := []string{"full_attention", "sliding_window", "chunked_local_attention", "mla_attention", "mamba"}
	stored := map[int]int{}
	for _, ev := range sub.Read(nil) {
		require.True(t, ev.HasGroup, "%v without its group", ev.Kind)
		require.GreaterOrEqual(t, ev.Group, 0)
		require.Less(t, ev.Group, len(g.Groups))
		if ev.Kind != prefix.BlockStored {
			continue
		}
		grp := g.Groups[ev.Group]
		assert.Equal(t, kinds[ev.Group], ev.GroupKind)
		assert.Equal(t, grp.BlockTokens, ev.BlockSize)
		if grp.Kind == kvcache.SlidingWindow {
			assert.Equal(t, grp.Window, ev.SlidingWindow)
		} else {
			assert.Zero(t, ev.SlidingWindow)
		}
		want := prefix.Keys(nil, prefix.Namespace{}, grp.BlockTokens, ids)
		for j, k := range ev.Keys {
			assert.Contains(t, want, k, "group %d key %d", ev.Group, j)
		}
		stored[ev.Group] += len(ev.Keys)
	}
	assert.Equal(t, 200/16, stored[0], "the full group stores every whole block")
	assert.Equal(t, 200/32, stored[3], "the MLA group in its 32-token blocks")
	assert.Zero(t, stored[4], "a recurrent state caches no blocks")
}

// A Hybrid's new subscription gets the events of operations after Subscribe, not those every
// group held back for the subscriber before it, and the first event after it signals it; so
// does one made through a group's Manager, which reads the Hybrid's one feed.
func TestHybridSubscribeGetsLaterEvents(t *testing.T) {
	for _, via := range []int{-1, 0, 3} {
		t.Run(fmt.Sprintf("group %d", via), func(t *testing.T) { hybridSubscribeGetsLaterEvents(t, via) })
	}
}

// hybridSubscribeGetsLaterEvents makes the second subscription through h.Subscribe (via -1)
// or through group via's Manager.
func hybridSubscribeGetsLaterEvents(t *testing.T, via int) {
	h := newHybrid(t, hostDevice(t, 64<<10), smallHybrid(true))
	first, err := h.Subscribe(1 << 12)
	require.NoError(t, err)
	dst := make([][]int64, h.Groups())
	ids := func(base int) []prefix.Token {
		p := make([]prefix.Token, 64)
		for i := range p {
			p[i] = prefix.Token(base + i)
		}
		return p
	}
	_, err = h.AppendTokenIDs(1, ids(1000), dst)
	require.NoError(t, err)
	select {
	case <-first.Ready():
	default:
		t.Fatal("the first subscription was not told of the append's events")
	}
	subscribe := h.Subscribe
	if via >= 0 {
		subscribe = h.Group(via).Subscribe
	}
	second, err := subscribe(1 << 12)
	require.NoError(t, err)
	select {
	case <-second.Ready():
		t.Fatal("the second subscription was told of events from before it")
	default:
	}
	_, err = h.AppendTokenIDs(2, ids(5000), dst)
	require.NoError(t, err)
	select {
	case <-second.Ready():
	default:
		t.Fatal("the events after Subscribe did not signal the new subscription")
	}
	stored := func(evs []prefix.Event) map[prefix.Key]bool {
		m := map[prefix.Key]bool{}
		for _, ev := range evs {
			if ev.Kind == prefix.BlockStored {
				for _, k := range ev.Keys {
					m[k] = true
				}
			}
		}
		return m
	}
	of := func(p []prefix.Token) prefix.Key { return prefix.Keys(nil, prefix.Namespace{}, 16, p)[0] }
	got1, got2 := stored(first.Read(nil)), stored(second.Read(nil))
	assert.True(t, got1[of(ids(1000))] && got1[of(ids(5000))], "the first subscription reads both appends' blocks")
	assert.False(t, got2[of(ids(1000))], "the second reads nothing from before it")
	assert.True(t, got2[of(ids(5000))], "the second reads the later append's blocks")
}

// A closed Hybrid refuses a subscription, as a closed Manager does: Close would never close it,
// nor would any event reach it.
func TestHybridSubscribeAfterClose(t *testing.T) {
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(true),
		Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true})
	require.NoError(t, err)
	require.NoError(t, h.Close())
	sub, err := h.Subscribe(1)
	require.ErrorIs(t, err, kvcache.ErrClosed)
	assert.Nil(t, sub)
}

// A group's cache dropped alone (its DropCache, as a ledger's drop request calls it) is an
// AllBlocksCleared of that group: a subscriber that clears what the event names keeps the
// other groups' blocks, and holds exactly what each group caches.
func TestHybridGroupClearNamesItsGroup(t *testing.T) {
	g := smallHybrid(false)
	h := newHybrid(t, hostDevice(t, 64<<10), g)
	sub, err := h.Subscribe(1 << 12)
	require.NoError(t, err)
	ids := make([]prefix.Token, 200)
	for i := range ids {
		ids[i] = prefix.Token(i + 1)
	}
	_, err = h.AppendTokenIDs(1, ids, make([][]int64, h.Groups()))
	require.NoError(t, err)
	n, err := h.Group(1).DropCache()
	require.NoError(t, err)
	require.Zero(t, n, "the window's blocks are held: they forget their keys")

	views := make([]map[prefix.Key]bool, h.Groups())
	for i := range views {
		views[i] = map[prefix.Key]bool{}
	}
	for _, ev := range sub.Read(nil) {
		require.True(t, ev.HasGroup, "%v without its group", ev.Kind)
		switch ev.Kind {
		case prefix.BlockStored:
			for _, k := range ev.Keys {
				views[ev.Group][k] = true
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				delete(views[ev.Group], k)
			}
		case prefix.AllBlocksCleared:
			clear(views[ev.Group])
		}
	}
	for i := range views {
		want := map[prefix.Key]bool{}
		for _, k := range h.Group(i).CachedKeys(nil) {
			want[k] = true
		}
		assert.Equal(t, want, views[i], "group %d", i)
	}
	assert.NotEmpty(t, views[0], "the full group keeps its blocks")
}
