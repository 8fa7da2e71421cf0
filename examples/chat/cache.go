package main

import (
	"github.com/pagedkv/pagedkv/kvcache"
)

// cache is what the loop asks of the KV cache, in the Hybrid's terms: a slot list per layer
// group. A *kvcache.Hybrid is one; single makes a Manager one of a single group.
type cache interface {
	StartSequence(seq kvcache.SeqID, p kvcache.Prompt) (int, error)
	AppendTokenIDs(seq kvcache.SeqID, ids []kvcache.TokenID, dst [][]int64) ([][]int64, error)
	AppendTokens(seq kvcache.SeqID, n int, dst [][]int64) ([][]int64, error)
	FreeSequence(seq kvcache.SeqID) error
	Compact(opts kvcache.CompactOptions) (kvcache.CompactResult, error)
	Groups() int
	Group(i int) *kvcache.Manager
	Close() error
}

// single is a Manager seen as a cache of one group: dst[0] gets its slots.
type single struct{ *kvcache.Manager }

func (s single) AppendTokenIDs(seq kvcache.SeqID, ids []kvcache.TokenID, dst [][]int64) ([][]int64, error) {
	var err error
	dst[0], err = s.Manager.AppendTokenIDs(seq, ids, dst[0])
	return dst, err
}

func (s single) AppendTokens(seq kvcache.SeqID, n int, dst [][]int64) ([][]int64, error) {
	var err error
	dst[0], err = s.Manager.AppendTokens(seq, n, dst[0])
	return dst, err
}

func (s single) Groups() int { return 1 }

func (s single) Group(int) *kvcache.Manager { return s.Manager }
