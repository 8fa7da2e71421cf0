package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/sequence"
)

// hybridSeq is a Hybrid's record of one sequence: the same sequence in each group, so that a
// decode step finds all of them with one lookup instead of one per group.
type hybridSeq struct {
	id   SeqID
	seqs []*sequence.Sequence // by group; each is that group's registry's (in inline up to 4)
	// inline holds seqs for a model of up to 4 groups, so that the record and the pointers a
	// step reads lie in one cache line.
	inline [4]*sequence.Sequence
}

// hybridIndex maps sequence ids to the Hybrid's records. Like sequence.Registry, a small
// direct-mapped cache sits in front of the map and removed records are kept for reuse, so a
// lookup of a sequence of the running batch is one load and steady state allocates nothing.
//
// The Hybrid keeps it in step with its groups' registries under its lock: a record exists for
// exactly the ids every group holds, and every operation that creates or removes a group's
// sequence (AddSequence, an append that creates it, StartSequence, Fork, FreeSequence) calls
// sync for the ids it touched. Verify checks both directions.
type hybridIndex struct {
	groups int
	m      map[SeqID]*hybridSeq
	free   []*hybridSeq
	cache  [1 << hybridCacheBits]*hybridSeq
}

const hybridCacheBits = 12

func hybridSlot(id SeqID) uint {
	return uint((uint64(id) * 0x9e3779b97f4a7c15) >> (64 - hybridCacheBits))
}

// newHybridIndex returns an empty index for a Hybrid of groups groups.
func newHybridIndex(groups int) *hybridIndex {
	return &hybridIndex{groups: groups, m: make(map[SeqID]*hybridSeq)}
}

// get returns the record of id, or nil.
func (x *hybridIndex) get(id SeqID) *hybridSeq {
	slot := hybridSlot(id)
	if r := x.cache[slot]; r != nil && r.id == id {
		return r
	}
	r := x.m[id]
	if r != nil {
		x.cache[slot] = r
	}
	return r
}

// sync makes the record of id agree with the groups: it holds each group's sequence when every
// group has one, and is gone otherwise.
func (x *hybridIndex) sync(id SeqID, groups []*Manager) {
	r := x.get(id)
	for _, m := range groups {
		if _, ok := m.seqs.Get(id); !ok {
			x.remove(r)
			return
		}
	}
	if r == nil {
		r = x.add(id)
	}
	for i, m := range groups {
		r.seqs[i], _ = m.seqs.Get(id)
	}
}

// add makes an empty record for id, which has none.
func (x *hybridIndex) add(id SeqID) *hybridSeq {
	var r *hybridSeq
	if n := len(x.free); n > 0 {
		r, x.free = x.free[n-1], x.free[:n-1]
	} else {
		r = &hybridSeq{}
		r.seqs = r.inline[:0]
		if x.groups > len(r.inline) {
			r.seqs = make([]*sequence.Sequence, 0, x.groups)
		}
		r.seqs = r.seqs[:x.groups]
	}
	r.id = id
	x.m[id] = r
	x.cache[hybridSlot(id)] = r
	return r
}

// remove forgets r (nil: nothing) and keeps it for reuse.
func (x *hybridIndex) remove(r *hybridSeq) {
	if r == nil {
		return
	}
	if slot := hybridSlot(r.id); x.cache[slot] == r {
		x.cache[slot] = nil
	}
	delete(x.m, r.id)
	clear(r.seqs) // no record keeps a group's recycled sequence alive
	x.free = append(x.free, r)
}

// verify checks the index against the groups: a record for each sequence of group 0 that every
// group holds, holding each group's sequence, and no other record. The lock is held.
func (x *hybridIndex) verify(groups []*Manager) []error {
	var errs []error
	want := 0
	groups[0].seqs.All(func(s *sequence.Sequence) bool {
		r := x.m[s.ID]
		all := true
		for i, m := range groups {
			g, ok := m.seqs.Get(s.ID)
			all = all && ok
			if r != nil && (!ok || r.seqs[i] != g) {
				errs = append(errs, fmt.Errorf("kvcache: verify: sequence %d: the hybrid's record of group %d is not the group's sequence", s.ID, i))
			}
		}
		if all {
			want++
			if r == nil {
				errs = append(errs, fmt.Errorf("kvcache: verify: sequence %d: every group holds it, the hybrid has no record", s.ID))
			}
		}
		return true
	})
	if len(x.m) != want {
		errs = append(errs, fmt.Errorf("kvcache: verify: the hybrid has %d sequence records, the groups hold %d sequences in common", len(x.m), want))
	}
	for slot, r := range x.cache {
		if r != nil && (x.m[r.id] != r || hybridSlot(r.id) != uint(slot)) {
			errs = append(errs, fmt.Errorf("kvcache: verify: sequence %d: a removed record is cached", r.id))
		}
	}
	return errs
}
