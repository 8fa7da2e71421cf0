package kvcache_test

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// The groups of a Hybrid publish to one feed while writers append and a reader takes: per
// group, replayed, the events remove only what they stored and end at the group's cached keys.
func TestHybridEventStressReplay(t *testing.T) {
	g := smallHybrid(false)
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: g, Limit: 8 << 20, Capacity: 2 << 20, NoBackground: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	sub, err := h.Subscribe(1 << 20)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var live []kvcache.SeqID
			for i := range 150 {
				seq := kvcache.SeqID(w*1000 + i)
				ids := make([]prefix.Token, 16*(1+i%40)+i%5)
				for j := range ids {
					ids[j] = prefix.Token((i%11)*1000 + j + w*100000*(i%2))
				}
				if _, err := h.AppendTokenIDs(seq, ids, make([][]int64, h.Groups())); err != nil {
					_ = h.FreeSequence(seq)
					continue
				}
				if live = append(live, seq); len(live) > 3 {
					_ = h.FreeSequence(live[0])
					live = live[1:]
				}
			}
			for _, seq := range live {
				_ = h.FreeSequence(seq)
			}
		}()
	}
	got := readUntilDone(sub, &wg)
	cached := make([]map[prefix.Key]bool, len(g.Groups))
	for i := range cached {
		cached[i] = map[prefix.Key]bool{}
	}
	for _, ev := range got {
		require.True(t, ev.HasGroup)
		c := cached[ev.Group]
		switch ev.Kind {
		case prefix.BlockStored:
			require.Len(t, ev.Tokens, len(ev.Keys)*g.Groups[ev.Group].BlockTokens)
			for _, k := range ev.Keys {
				require.False(t, c[k], "group %d stored twice", ev.Group)
				c[k] = true
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				require.True(t, c[k], "group %d removed before it was stored", ev.Group)
				delete(c, k)
			}
		default:
			t.Fatalf("unexpected %v", ev)
		}
	}
	for i := range g.Groups {
		want := map[prefix.Key]bool{}
		for _, k := range h.Group(i).CachedKeys(nil) {
			want[k] = true
		}
		require.Equal(t, want, cached[i], "group %d", i)
	}
	require.NoError(t, h.Verify())
}
