package kvcache

import "github.com/pagedkv/pagedkv/sequence"

// Stats is a snapshot of a manager.
type Stats struct {
	Sequences     int
	Tokens        int64 // over all sequences, shared tokens counted once per sequence
	LiveBlocks    int   // distinct blocks sequences hold
	BlockRefs     int   // block references held by sequences (LiveBlocks + sharing)
	BlocksPerPage int
	PageBytes     uint64

	MappedPages  int // pages with physical memory
	FreePages    int // mapped pages with no block in use (the reserve)
	PartialPages int // mapped pages with some blocks in use
	FullPages    int // mapped pages with every block in use
	MappedBytes  uint64
	// ScratchBytes is device memory the manager holds beside the arena: the copy kernel's pair
	// staging buffer, mapped by the first compaction on a GPU and kept until Close.
	ScratchBytes uint64

	// PageOverhead is MappedPages / ceil((LiveBlocks + idle cached blocks) / BlocksPerPage): 1
	// means no page holds memory the blocks could do without (0 when there are none).
	PageOverhead float64

	SyncMaps       uint64 // pages an append had to map itself (the reserve was empty)
	BackgroundMaps uint64 // pages the reserve goroutine (or Settle) mapped
	Unmaps         uint64 // pages returned to the device
	CopyOnWrites   uint64 // shared tail blocks copied on append
	Compactions    uint64 // compactions that moved blocks
	BlocksMoved    uint64 // blocks moved by compactions
	ReserveErr     error  // the reserve goroutine's last error, if any

	Prefix PrefixStats // the prefix cache

	HostBlocks, HostFreeBlocks int    // the host tier's blocks, and how many are free
	SwappedSequences           int    // sequences swapped out to the host tier
	SwapOuts, SwapIns          uint64 // blocks swapped out and in
	// HostSwappedBlocks are the host blocks swapped-out sequences hold. With
	// Prefix.HostCachedBlocks and HostFreeBlocks they add up to HostBlocks.
	HostSwappedBlocks int

	Warnings Warnings // what the runtime probably did not mean
}

// Warnings count calls that the manager serves, by design or without Config.Strict, but that a
// runtime rarely means. Each is a bug to look for when it is not zero.
type Warnings struct {
	// ImplicitSequences are sequences an append created (AppendTokens or AppendTokenIDs of an id
	// the manager did not hold): a late append after FreeSequence holds blocks again, unseen.
	// Config.Strict makes them errors.
	ImplicitSequences uint64
	// UnkeyedAppends are appends without ids (AppendTokens) to a keyed sequence: its blocks stop
	// being cached from there on. Config.Strict makes them errors.
	UnkeyedAppends uint64
	// RepeatedPrompts are first appends after a StartSequence hit of h tokens that begin with
	// those h tokens again: the whole prompt appended instead of Prompt.Tokens[h:].
	RepeatedPrompts uint64
	// OpenSwaps are Swaps returned by SwapOut and SwapIn and not closed yet; Close reports
	// them. A count that only grows is a leak.
	OpenSwaps int64
}

// Stats returns a snapshot (the zero Stats for a nil manager). A closed manager maps nothing: its
// page figures are 0 once Close has returned every page (see Close).
func (m *Manager) Stats() Stats {
	if !m.made() {
		return Stats{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s := Stats{
		Sequences:      m.seqs.Len(),
		LiveBlocks:     m.arena.Live(),
		BlocksPerPage:  m.bpp,
		PageBytes:      m.cfg.PageSize,
		MappedPages:    m.arena.Mapped(),
		FreePages:      m.arena.FreePages(),
		PartialPages:   m.arena.PartialPages(),
		MappedBytes:    uint64(m.arena.Mapped()) * m.cfg.PageSize,
		ScratchBytes:   m.back.scratchBytes(),
		SyncMaps:       m.counters.syncMaps,
		BackgroundMaps: m.counters.bgMaps,
		Unmaps:         m.counters.unmaps,
		CopyOnWrites:   m.counters.cows,
		Compactions:    m.counters.compactions,
		BlocksMoved:    m.counters.moved,
		ReserveErr:     m.growErr,
		Warnings: Warnings{ImplicitSequences: m.counters.implicit, UnkeyedAppends: m.counters.unkeyed,
			RepeatedPrompts: m.counters.repeated, OpenSwaps: m.openSwaps.Load()},
	}
	if m.closed && !m.backOpen { // Close returned every page: the arena still records where blocks were
		s.MappedPages, s.FreePages, s.PartialPages, s.MappedBytes = 0, 0, 0, 0
	}
	s.FullPages = s.MappedPages - s.FreePages - s.PartialPages
	a := m.arena
	s.Prefix = PrefixStats{
		QueryTokens: m.counters.queryTokens, HitTokens: m.counters.hitTokens, UnheldHitTokens: m.counters.unheldHitTokens,
		Stored:    m.counters.stored,
		Evictions: m.counters.evictions, CachedBlocks: a.Index().Len(), IdleBlocks: a.Idle(),
		IdleBytes: uint64(a.Idle()) * m.cfg.BlockStride(), CacheOnlyPages: a.CacheOnlyPages(),
		CacheOnlyBytes: uint64(a.CacheOnlyPages()) * m.cfg.PageSize,
		HostHitTokens:  m.counters.hostHitTokens, HostStored: m.counters.hostStored, HostEvictions: m.counters.hostEvictions,
		Tiers:        m.tierStats(),
		HostFailures: m.counters.hostFailures,
		Checkpoints:  CheckpointStats{Made: m.counters.checkpoints, Skipped: m.counters.checkpointsSkipped, Resumed: m.counters.resumed},
	}
	if m.host != nil {
		s.Prefix.HostCachedBlocks = m.host.cache.Len()
	}
	if s.Prefix.QueryTokens > 0 {
		s.Prefix.HitRate = float64(s.Prefix.HitTokens) / float64(s.Prefix.QueryTokens)
	}
	m.seqs.All(func(q *sequence.Sequence) bool {
		s.Tokens += int64(q.Tokens)
		s.BlockRefs += keptBlocks(q, m.sinkBlocks())
		if q.Swapped {
			s.SwappedSequences++
		}
		return true
	})
	s.HostBlocks, s.HostFreeBlocks, s.HostSwappedBlocks = m.host.blocks(), m.host.freeBlocks(), m.host.swappedBlocks()
	s.SwapOuts, s.SwapIns = m.counters.swapOuts, m.counters.swapIns
	if used := s.LiveBlocks + a.Idle(); used > 0 && s.MappedPages > 0 {
		s.PageOverhead = float64(s.MappedPages) / float64((used+m.bpp-1)/m.bpp)
	}
	return s
}
