package kvcache

import (
	"errors"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// The host prefix cache (Config.HostPrefixCache) keeps cached blocks' content in the host tier
// as well, so that the device cache's evictions lose nothing the host has room for:
//
//   - Write-back on release: when FreeSequence releases a keyed sequence, its cached blocks
//     that the host does not hold yet (idle now, or still shared) are copied to host blocks
//     (free ones the swap slots leave, else the host cache's least recently used) with one
//     launch on the legacy default stream (stream 0), so the copy runs after the runtime's
//     kernels that wrote them on blocking streams. Evicting a device block later costs no copy;
//     it only waits for the last write-back if that is still running.
//   - Fetch on a hit: StartSequence continues the device cache's hit with the blocks the host
//     holds, copied into new device blocks with one launch on stream 0 (before the runtime's
//     kernels that read them), and cached on the device again. No room on the device: the
//     prompt's rest is computed as without the host cache.
//
// The host tier's blocks are shared with swapping: a swap-out takes free host blocks first,
// then the host cache's least recently used. The cache never takes the swap slots
// (Config.HostSwapBlocks, hosttier.go). KV events carry Medium "CPU" for the host cache.

// hostCaching reports whether the host prefix cache is on.
func (m *Manager) hostCaching() bool { return m.host != nil && m.cfg.HostPrefixCache }

// writeBack copies the idle cached blocks of keyed sequence s that the host does not hold yet
// to host blocks; FreeSequence calls it after releasing s's blocks (a swapped-out sequence's:
// the device blocks it kept). A failed launch leaves the host cache as it was (counted in
// PrefixStats.HostFailures): the cache is an optimisation, and the sequence is freed
// regardless.
func (m *Manager) writeBack(s *sequence.Sequence) {
	if !m.hostCaching() || !s.Keyed {
		return
	}
	sc := &m.swap
	sc.pairs, sc.at = sc.pairs[:0], sc.at[:0]
	room := m.host.cacheRoom()
	for i, k := range s.Keys {
		if len(sc.at) == room {
			break
		}
		b := s.Blocks[i]
		if b == NullBlock { // swapped out (on the host: its slot is freed) or dropped
			continue
		}
		// A cached block is full and never written again, so one still held by other
		// sequences (a shared system prompt) is copied too: a prompt every running request
		// shares would otherwise never reach the host, nor the tiers below it.
		e := m.arena.Entry(b)
		if e == nil || e.Key != k || m.host.cache.Get(k) != nil {
			continue
		}
		sc.pairs = append(sc.pairs, int64(b), 0)
		sc.at = append(sc.at, int32(i))
	}
	n := len(sc.at)
	if n == 0 {
		return
	}
	m.host.reserveCache(n)
	for j, h := range m.host.taken {
		sc.pairs[2*j+1] = int64(h)
	}
	marks, err := m.back.copyAsync(0, sc.pairs)
	if err != nil {
		m.host.abortWritten(m.emitHostRemoved) // a launch that failed midway may have written some
		m.counters.hostFailures++
		return
	}
	m.host.commit(m.emitHostRemoved)
	m.setLastCopy(&Swap{marks: marks})
	for j := n - 1; j >= 0; j-- { // the tail first, so that the prefix is the most recently used
		k, h := s.Keys[sc.at[j]], m.host.taken[j]
		if m.tiers == nil {
			m.host.store(k, h)
		} else {
			m.demote(s, int(sc.at[j]), m.host.cache.Add(k, h))
		}
	}
	m.emitStoredRuns(s, sc.at, prefix.MediumCPU)
	m.counters.hostStored += uint64(n)
}

// fetchHost continues StartSequence's hit in s (keyed, holding the device cache's hit) with
// the prompt's next blocks that the host cache holds: it copies them into new device blocks,
// caches those under their keys and appends them to s (blocks, keys and ids). It returns the
// blocks fetched. No room on the device, or a failed driver call or launch (counted in
// PrefixStats.HostFailures), fetches none and changes nothing: the runtime computes them.
func (m *Manager) fetchHost(s *sequence.Sequence, p Prompt, maxBlocks int) int {
	if !m.hostCaching() || len(s.Keys) >= maxBlocks {
		return 0
	}
	bt := m.cfg.BlockTokens
	from := len(s.Keys)
	sc := &m.swap
	sc.pairs, sc.keys = sc.pairs[:0], sc.keys[:0]
	parent := s.Root
	if from > 0 {
		parent = s.Keys[from-1]
	}
	for i := from; i < maxBlocks; i++ {
		k := m.promptKey(&p, i, parent)
		e := m.host.cache.Get(k)
		if e == nil || m.arena.Index().Get(k) != nil {
			break
		}
		sc.pairs = append(sc.pairs, int64(e.Block), 0)
		sc.keys = append(sc.keys, k)
		parent = k
	}
	n := len(sc.keys)
	if n == 0 {
		return 0
	}
	if !m.copyFromHost(n) {
		return 0
	}
	m.commitEvictions()
	for j := n - 1; j >= 0; j-- {
		m.host.touch(m.host.cache.Get(sc.keys[j]))
		m.tierHit(sc.keys[j]) // the start succeeds from here on: a block a tier gave is a tier hit
	}
	for j, k := range sc.keys {
		d := m.newBlocks[j]
		m.arena.Cache(d, k)
		s.Blocks = append(s.Blocks, d)
		s.Keys = append(s.Keys, k)
	}
	s.IDs = append(s.IDs, p.Tokens[from*bt:(from+n)*bt]...)
	m.counters.stored += uint64(n)
	m.emitStoredOn(s, from, from+n, prefix.MediumGPU)
	return n
}

// copyFromHost takes n new device blocks (m.newBlocks) and launches, on stream 0, the copy of
// m.swap.pairs' host blocks into them (it fills in the destinations). No room on the device, or
// a failed driver call or launch (counted in PrefixStats.HostFailures), gives the blocks back,
// and it reports false. The copy is the newest between the tiers (setLastCopy); the caller
// commits or rolls back what takeBlocks evicted.
func (m *Manager) copyFromHost(n int) bool {
	if err := m.takeBlocks(n, -1); err != nil {
		if !errors.Is(err, ErrOutOfMemory) {
			m.counters.hostFailures++
		}
		return false
	}
	pairs := m.swap.pairs
	for j := range n {
		pairs[2*j+1] = int64(m.newBlocks[j])
	}
	marks, err := m.back.copyAsync(0, pairs)
	if err != nil {
		m.rollbackAfterCopy(m.newBlocks...) // a launch that failed midway may have written some
		m.counters.hostFailures++
		return false
	}
	m.setLastCopy(&Swap{marks: marks})
	return true
}

// emitStoredRuns queues one BlockStored event on medium for each run of consecutive blocks of
// s among at (positions, ascending).
func (m *Manager) emitStoredRuns(s *sequence.Sequence, at []int32, medium string) {
	for j := 0; j < len(at); {
		r := j + 1
		for r < len(at) && at[r] == at[r-1]+1 {
			r++
		}
		m.emitStoredOn(s, int(at[j]), int(at[r-1])+1, medium)
		j = r
	}
}

// setLastCopy keeps sw as the newest copy between the tiers on stream 0, closing the one
// before (stream order: it is done when sw is).
func (m *Manager) setLastCopy(sw *Swap) {
	if m.lastCopy != nil {
		m.lastCopy.Close()
	}
	m.lastCopy = sw
}

// settleCopies waits for the newest copy between the tiers, if it may still run: a device
// block it reads or writes is about to be reused or unmapped.
func (m *Manager) settleCopies() {
	if m.lastCopy == nil {
		return
	}
	if err := m.lastCopy.Wait(); err != nil {
		m.counters.hostFailures++
	}
	m.lastCopy.Close()
	m.lastCopy = nil
}

// emitHostRemoved queues a BlockRemoved event for key k leaving the host cache.
func (m *Manager) emitHostRemoved(k prefix.Key) {
	m.forgetFromTier(k)
	m.counters.hostEvictions++
	m.emitRemovedOn(k, prefix.MediumCPU)
}
