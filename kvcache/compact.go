package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/sequence"
)

// CompactOptions bound one compaction.
type CompactOptions struct {
	// MaxBytes bounds the bytes of block data moved (0: no bound). Source pages are evacuated
	// whole, sparsest first, while they fit.
	MaxBytes uint64
	// Stream is the stream the block copies run on; Compact waits for it before returning.
	Stream kernels.Stream
}

// CompactResult says what a compaction did.
type CompactResult struct {
	BlocksMoved   int
	BytesMoved    uint64
	PagesReleased int // pages returned to the device
}

// Compact moves live blocks out of the sparsest and highest pages into the free blocks of the
// pages worth keeping (the ceil(live/blocks-per-page) pages holding the most live blocks, so the
// fewest bytes move), copies them with one copy_blocks launch on opts.Stream, rewrites the block
// tables of the sequences holding them, and returns the emptied pages to the device, keeping
// Config.ReservePages free pages mapped. Sequences keep their tokens; only block ids change.
// Without a byte budget the arena ends at the optimum: ceil(live blocks / blocks per page) pages
// plus the reserve.
//
// Prefix-cached blocks, held or idle, count as live and move with their keys: packing them is
// what keeps the cache from pinning pages. Idle cached blocks beyond what
// Config.PrefixCacheBytes allows are evicted first, whole pages at a time, since copying blocks
// the bound would drop costs bandwidth and saves nothing.
//
// Call it between steps: kernels still reading the old block ids, or tables exported before,
// must be finished or re-exported afterwards. Appends wait while it runs. If the copy fails
// no block has moved and every table is as it was; only the idle cached blocks beyond the bound,
// evicted before the plan (their BlockRemoved events sent), stay evicted. If returning a page
// fails the compaction stands and the error says so.
func (m *Manager) Compact(opts CompactOptions) (CompactResult, error) {
	if !m.made() {
		return CompactResult{}, notMadeCall("compact")
	}
	m.growMu.Lock()
	defer m.growMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return CompactResult{}, fmt.Errorf("kvcache: compact: %w", ErrClosed)
	}
	res, err := m.compactLocked(opts, m.cfg.ReservePages)
	if err != nil {
		return res, fmt.Errorf("kvcache: %w", err)
	}
	return res, nil
}

// compactLocked compacts with growMu and mu held and leaves keepFree free pages mapped. Its
// error names the operation ("compact: ...") and leaves the layer to the caller.
func (m *Manager) compactLocked(opts CompactOptions, keepFree int) (CompactResult, error) {
	var res CompactResult
	// Cached blocks the bound would drop anyway are evicted first, not copied, so that what is
	// packed stays packed.
	m.dropExcess(keepFree)
	pairs := m.planCompaction(opts.MaxBytes)
	if len(pairs) > 0 {
		if err := m.back.copyBlocks(opts.Stream, pairs); err != nil {
			m.publish() // the evictions before the plan stand: a later rollback must not drop them
			return res, fmt.Errorf("compact: %w", err)
		}
		moved := make(map[sequence.Block]sequence.Block, len(pairs)/2)
		for i := 0; i < len(pairs); i += 2 {
			src, dst := sequence.Block(pairs[i]), sequence.Block(pairs[i+1])
			m.arena.Move(src, dst)
			moved[src] = dst
		}
		m.seqs.All(func(s *sequence.Sequence) bool {
			for i, b := range s.Blocks {
				if nb, ok := moved[b]; ok {
					s.Blocks[i] = nb
				}
			}
			if len(s.Blocks) > 0 { // the fast path's copy: FastRoom stays, the tail is still s's alone
				s.Tail = s.Blocks[len(s.Blocks)-1]
			}
			return true
		})
		res.BlocksMoved = len(pairs) / 2
		res.BytesMoved = uint64(res.BlocksMoved) * m.cfg.BlockStride()
		m.counters.compactions++
		m.counters.moved += uint64(res.BlocksMoved)
	}
	released, err := m.trimLocked(keepFree)
	res.PagesReleased = released
	m.publish()
	if err != nil {
		return res, fmt.Errorf("compact: %w", err)
	}
	return res, nil
}

// planCompaction returns the (src, dst) block pairs of a compaction moving at most maxBytes
// (0: no bound), changing nothing: the arena's plan (arena.PlanCompaction).
func (m *Manager) planCompaction(maxBytes uint64) []int64 {
	limit := -1
	if maxBytes > 0 {
		limit = int(min(maxBytes/m.cfg.BlockStride(), uint64(MaxPages)*uint64(m.bpp)))
	}
	return m.arena.PlanCompaction(limit)
}

// trimLocked brings the idle pages to target: it unmaps free pages from the top (and evicts
// cache-only pages beyond the bound), then maps pages until target are ready or memory runs
// out. It holds mu throughout (compaction is not a hot path). It returns the pages unmapped.
func (m *Manager) trimLocked(target int) (int, error) {
	released := 0
	for !m.static && m.spare() > target && (m.arena.FreePages() > 0 || m.dropOverBound(target)) {
		p, _ := m.arena.HighestFree()
		if err := m.unmapPage(p); err != nil {
			return released, fmt.Errorf("return page %d: %w", p, err)
		}
		m.counters.unmaps++
		m.arena.SetState(p, arena.Unmapped)
		released++
	}
	for !m.static && !m.asleep && m.spare() < target {
		if _, err := m.mapPageLocked(false); err != nil {
			if errors.Is(err, ErrOutOfMemory) {
				break // the reserve is bounded by memory, like the reserve goroutine's
			}
			return released, fmt.Errorf("top up the reserve: %w", err)
		}
	}
	return released, nil
}
