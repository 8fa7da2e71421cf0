package kvcache_test

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// Writers that append, fail for want of memory and free on several goroutines, and a reader
// that takes the events on another: replayed, the events name blocks whose keys their token ids
// hash to, remove only what was stored, and end at exactly the manager's cached keys.
func TestEventStressReplay(t *testing.T) {
	cfg := tinyConfig()
	cfg.Capacity = 6 * cfg.PageSize
	m := newManager(t, hostDevice(t, 32<<10), cfg)
	sub, err := m.Subscribe(1 << 20)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var live []kvcache.SeqID // two held at a time: 3 writers can ask more than the cache holds
			for i := range 300 {
				seq := kvcache.SeqID(w*1000 + i)
				ids := make([]prefix.Token, 4*(1+i%5)+i%3)
				for j := range ids {
					ids[j] = prefix.Token((i%7)*100 + j + w*10000*(i%2))
				}
				if _, err := m.AppendTokenIDs(seq, ids, nil); err != nil {
					_ = m.FreeSequence(seq)
					continue
				}
				if i%4 == 0 {
					_ = m.Truncate(seq, 2)
					_, _ = m.AppendTokenIDs(seq, []prefix.Token{9, 9, 9, 9, 9, 9}, nil)
				}
				if live = append(live, seq); len(live) > 2 {
					_ = m.FreeSequence(live[0])
					live = live[1:]
				}
			}
			for _, seq := range live {
				_ = m.FreeSequence(seq)
			}
		}()
	}
	got := readUntilDone(sub, &wg)
	cached := map[prefix.Key]bool{}
	var x prefix.Hasher
	root := prefix.Root(prefix.Namespace{}, cfg.BlockTokens)
	for _, ev := range got {
		require.Equal(t, prefix.MediumGPU, ev.Medium)
		switch ev.Kind {
		case prefix.BlockStored:
			require.Len(t, ev.Tokens, len(ev.Keys)*cfg.BlockTokens)
			parent := ev.Parent
			if ev.ParentIsRoot {
				require.Equal(t, root, parent)
			}
			for i, k := range ev.Keys {
				require.Equal(t, x.Next(parent, ev.Tokens[i*cfg.BlockTokens:(i+1)*cfg.BlockTokens]), k)
				require.False(t, cached[k], "stored twice")
				cached[k], parent = true, k
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				require.True(t, cached[k], "removed before it was stored")
				delete(cached, k)
			}
		default:
			t.Fatalf("unexpected %v", ev)
		}
	}
	want := map[prefix.Key]bool{}
	for _, k := range m.CachedKeys(nil) {
		want[k] = true
	}
	require.Equal(t, want, cached)
	require.NoError(t, m.Verify())
}

// readUntilDone reads sub on every signal until the writers of wg are done, then reads what is
// left, and returns every event in order.
func readUntilDone(sub *prefix.Subscription, wg *sync.WaitGroup) []prefix.Event {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	var got, buf []prefix.Event
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		case <-sub.Ready():
		}
		buf = sub.Take(buf)
		got = append(got, buf...)
	}
	return sub.Read(got)
}
