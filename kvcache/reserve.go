package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/arena"
)

// kick wakes the reserve goroutine without blocking. Called with mu held.
func (m *Manager) kick() {
	if m.cfg.NoBackground {
		return
	}
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *Manager) reserveLoop() {
	defer close(m.done)
	for {
		select {
		case <-m.stop:
			return
		case <-m.wake:
			if err := m.settle(); err != nil {
				m.mu.Lock()
				m.growErr = err
				m.mu.Unlock()
			}
		}
	}
}

// Settle brings the idle pages (free, or holding only idle cached blocks) to the watermarks
// now: it maps pages until ReservePages are ready (within MemoryLimit and the device's memory)
// and beyond HighWatermark unmaps the highest free pages, then evicts and unmaps the oldest
// cache-only pages beyond what Config.PrefixCacheBytes allows. The reserve goroutine does the same in the
// background; with NoBackground the caller decides when. Driver calls happen outside the
// manager's lock, so appends proceed meanwhile.
func (m *Manager) Settle() error {
	if !m.made() {
		return notMadeCall("settle")
	}
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return fmt.Errorf("kvcache: settle: %w", ErrClosed)
	}
	return m.settle()
}

// reserveBatch bounds the pages one round of the reserve goroutine takes in flight: it maps or
// unmaps them all with the lock released, so that a cycle takes the lock twice per round, not
// twice per page. The lock is shared by every group of a Hybrid, whose appends then wait less.
const reserveBatch = 16

func (m *Manager) settle() error {
	m.growMu.Lock()
	defer m.growMu.Unlock()
	var errs []error
	for {
		more, p, err := m.pageRound(m.takeReserve, func(p arena.Page) error { return m.mapPage(p, false) }, // the reserve never takes memory from other models
			m.arena.MarkMapped, func(p arena.Page) { m.arena.SetState(p, arena.Unmapped) }, &m.counters.bgMaps)
		if err != nil && !errors.Is(err, ErrOutOfMemory) { // a spent budget bounds the reserve; it is no failure
			errs = append(errs, fmt.Errorf("kvcache: reserve page %d: %w", p, err))
		}
		if !more || err != nil {
			break
		}
	}
	for {
		more, p, err := m.pageRound(m.takeExcess, m.unmapPage,
			func(p arena.Page) { m.arena.SetState(p, arena.Unmapped) }, m.arena.MarkMapped, &m.counters.unmaps)
		if err != nil {
			errs = append(errs, fmt.Errorf("kvcache: return page %d: %w", p, err))
		}
		if !more || err != nil {
			break
		}
	}
	return errors.Join(errs...)
}

// pageRound is one round of the reserve goroutine: under the lock take puts a batch of pages in
// flight; outside it op maps or unmaps each in turn until one fails; under the lock again the
// pages op did are settled by done (and counted in n), the others put back by undo. It reports
// whether take gave any page, and the page that failed with op's error.
func (m *Manager) pageRound(take func() []arena.Page, op func(arena.Page) error, done, undo func(arena.Page), n *uint64) (bool, arena.Page, error) {
	m.mu.Lock()
	pages := take()
	m.mu.Unlock()
	if len(pages) == 0 {
		return false, 0, nil
	}
	k, err := 0, error(nil)
	for _, p := range pages {
		if err = op(p); err != nil {
			break
		}
		k++
	}
	m.mu.Lock()
	m.inflight -= len(pages)
	for i, p := range pages {
		if i < k {
			*n++
			done(p)
		} else {
			undo(p)
		}
	}
	m.mu.Unlock()
	if err != nil {
		return true, pages[k], err
	}
	return true, 0, nil
}

// takeReserve takes the unmapped pages the reserve needs to reach ReservePages, at most
// reserveBatch and within MemoryLimit, and puts them in flight: the caller maps them outside
// the lock. The lock and growMu are held; the slice is growMu's scratch.
func (m *Manager) takeReserve() []arena.Page {
	pages := m.reserving[:0]
	for !m.closed && !m.static && !m.asleep && m.spare()+len(pages) < m.cfg.ReservePages && len(pages) < reserveBatch {
		if m.checkLimit() != nil {
			break // the limit is a bound, not a failure of the reserve
		}
		p, ok := m.arena.TakeUnmapped()
		if !ok {
			break
		}
		m.inflight++
		pages = append(pages, p)
	}
	m.reserving = pages
	return pages
}

// takeExcess evicts the cache beyond its bound while pages are spare beyond HighWatermark, then
// takes the highest free pages beyond it, at most reserveBatch, and puts them in flight: the
// caller unmaps them outside the lock. The lock and growMu are held; the slice is growMu's
// scratch.
func (m *Manager) takeExcess() []arena.Page {
	pages := m.reserving[:0]
	if m.closed || m.static {
		return pages
	}
	m.dropOverBound(m.cfg.HighWatermark)
	m.publish()
	for m.arena.FreePages() > 0 && m.spare() > m.cfg.HighWatermark && len(pages) < reserveBatch {
		p, _ := m.arena.HighestFree()
		m.arena.SetState(p, arena.InFlight)
		m.inflight++
		pages = append(pages, p)
	}
	m.reserving = pages
	return pages
}
