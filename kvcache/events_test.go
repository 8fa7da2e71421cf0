package kvcache_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// Events read early keep their keys and tokens while thousands more are built after them (the
// manager carves events' slices from shared arrays and never writes one it handed out), every
// removed key was stored before, and a BlockStored says when its parent is the namespace root.
func TestEventsOwnTheirSlices(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig()) // 256 blocks of 4 tokens: the cache churns
	sub, err := m.Subscribe(1 << 16)
	require.NoError(t, err)
	bt := m.Config().BlockTokens
	var got []prefix.Event
	prompts := map[prefix.Key][]prefix.Token{} // first key of a sequence's run -> the tokens it covers
	ids := make([]prefix.Token, 9*bt+1)
	for s := range 400 { // 3,600 blocks stored, most of them evicted
		for i := range ids {
			ids[i] = prefix.Token(s*1000 + i)
		}
		_, err := m.AppendTokenIDs(kvcache.SeqID(s), ids[:5*bt], nil)
		require.NoError(t, err)
		_, err = m.AppendTokenIDs(kvcache.SeqID(s), ids[5*bt:], nil) // a second run, its parent a block
		require.NoError(t, err)
		require.NoError(t, m.FreeSequence(kvcache.SeqID(s)))
		keys := prefix.Keys(nil, prefix.Namespace{}, bt, ids)
		own := append([]prefix.Token(nil), ids...)
		prompts[keys[0]], prompts[keys[5]] = own[:5*bt], own[5*bt:9*bt]
		got = sub.Read(got)
	}
	var stored, removed int
	live := map[prefix.Key]bool{}
	for _, e := range got {
		switch e.Kind {
		case prefix.BlockStored:
			stored += len(e.Keys)
			toks, ok := prompts[e.Keys[0]]
			require.True(t, ok, "a stored run starts a sequence's append")
			require.Equal(t, toks, e.Tokens)
			parent := e.Parent
			if e.ParentIsRoot {
				assert.Equal(t, prefix.Root(prefix.Namespace{}, bt), parent)
			}
			for i, k := range e.Keys {
				var x prefix.Hasher
				require.Equal(t, x.Next(parent, toks[i*bt:(i+1)*bt]), k, "event keys intact")
				parent = k
				live[k] = true
			}
			assert.Equal(t, len(toks) == 5*bt, e.ParentIsRoot)
		case prefix.BlockRemoved:
			removed += len(e.Keys)
			for _, k := range e.Keys {
				require.True(t, live[k], "a removed key was stored and not removed since")
				delete(live, k)
			}
		}
	}
	assert.Equal(t, 400*9, stored)
	assert.Greater(t, removed, 3000)
}

// The manager holds events back for the subscriber's next Read and publishes them in
// batches: a Read still returns every event of every call that returned
// before it, in order, and a failed call in between drops none of the held ones.
func TestHeldEventsReachTheNextRead(t *testing.T) {
	m := newManager(t, hostDevice(t, 32<<10), tinyConfig())
	sub, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	bt := m.Config().BlockTokens
	var want []prefix.Key
	for s := range 20 { // held back, the subscriber told
		ids := make([]prefix.Token, bt)
		for i := range ids {
			ids[i] = prefix.Token(100*s + i)
		}
		_, err := m.AppendTokenIDs(kvcache.SeqID(s), ids, nil)
		require.NoError(t, err)
		want = append(want, prefix.Keys(nil, prefix.Namespace{}, bt, ids)...)
	}
	_, err = m.AppendTokens(99, 1<<30, nil) // fails: does not fit
	require.Error(t, err)
	var got []prefix.Key
	for _, ev := range sub.Read(nil) {
		require.Equal(t, prefix.BlockStored, ev.Kind)
		got = append(got, ev.Keys...)
	}
	assert.Equal(t, want, got)
	assert.Empty(t, sub.Read(nil), "nothing twice")
}
