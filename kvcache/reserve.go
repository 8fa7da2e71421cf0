package kvcache

import (
	"errors"
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/internal/arena"
)

// kick wakes the reserve goroutine without blocking. Called with mu held, or by holdTimer.
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
			if err := m.settle(time.Now(), false); err != nil {
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
// manager's lock, so appends proceed meanwhile. In a Hybrid's group, Settle also returns the
// pages the group holds beyond HighWatermark (see HybridConfig).
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
	return m.settle(time.Now(), true)
}

// reserveBatch bounds the pages one round of the reserve goroutine takes in flight: it maps or
// unmaps them all with the lock released, so that a cycle takes the lock twice per round, not
// twice per page. The lock is shared by every group of a Hybrid, whose appends then wait less.
const reserveBatch = 16

// settle is one cycle of the reserve at time t: it maps the reserve, then unmaps the spare pages
// beyond HighWatermark, all of them with all, else those the hold lets go (takeExcess).
func (m *Manager) settle(t time.Time, all bool) error {
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
		more, p, err := m.pageRound(func() []arena.Page { return m.takeExcess(t, all) }, m.unmapPage,
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

// takeExcess evicts the cache beyond its bound while pages are spare beyond the pages it keeps,
// then takes the highest free pages beyond them, at most reserveBatch, and puts them in flight:
// the caller unmaps them outside the lock. It keeps HighWatermark pages, or with a hold (and
// not all) those the hold does not let go at t. The lock and growMu are held; the slice is
// growMu's scratch.
func (m *Manager) takeExcess(t time.Time, all bool) []arena.Page {
	pages := m.reserving[:0]
	if m.closed || m.static {
		return pages
	}
	keep := m.cfg.HighWatermark
	switch {
	case m.asleep: // a sleeping manager keeps no reserve: what a free empties goes back
		keep = 0
	case m.holdFor > 0 && !all:
		keep = m.held(t)
	}
	m.dropOverBound(keep)
	m.publish()
	for m.arena.FreePages() > 0 && m.spare() > keep && len(pages) < reserveBatch {
		p, _ := m.arena.HighestFree()
		m.arena.SetState(p, arena.InFlight)
		m.inflight++
		pages = append(pages, p)
	}
	m.toReturn = max(0, m.toReturn-len(pages))
	if len(pages) < reserveBatch { // the pass is done: what it could not take was used meanwhile
		m.toReturn = 0
	}
	m.reserving = pages
	return pages
}

// The hold keeps a Hybrid's spare pages beyond HighWatermark mapped until no append has needed
// them for a whole period of holdFor: a batch that frees its pages and the next batch that maps
// them again would otherwise unmap and map them every time, in every group at once. Time runs
// in periods. An append's commit lowers holdLow, the fewest spare pages of the period. When a
// period ends, the pages spare throughout it beyond HighWatermark go back (toReturn), and a new
// period starts while spare pages remain beyond it. So memory a workload stops using goes back
// within two periods; Settle, Sleep and a budget's reclaim take it back at once, and a group
// holds no more than the budget has room for besides, so that under pressure the pages go back
// as they would without a hold.

// hybridHold is the period of a Hybrid's groups' hold.
const hybridHold = time.Second

// held returns the spare pages the hold keeps mapped at t: HighWatermark, and beyond it those
// that no period has found unused yet, as many as the budget has room for besides. The lock is
// held.
func (m *Manager) held(t time.Time) int {
	m.holdTick(t)
	hw, spare := m.cfg.HighWatermark, m.spare()
	if spare-m.toReturn <= hw {
		return hw
	}
	keep := spare - m.toReturn
	if room, ok := m.back.headroom(); ok { // a sibling short of memory could not take them back
		keep = min(keep, hw+int(min(room/m.cfg.PageSize, MaxPages)))
	}
	return keep
}

// holdTick ends the running period when it is over at t (or when none runs): the pages spare
// throughout it beyond HighWatermark become toReturn, and the next period starts if spare pages
// remain beyond the watermark. The lock is held.
func (m *Manager) holdTick(t time.Time) {
	spare := m.spare()
	m.holdLow = min(m.holdLow, spare)
	if t.Before(m.holdEnd) {
		return
	}
	m.toReturn = max(0, m.holdLow-m.cfg.HighWatermark)
	m.holdLow = spare - m.toReturn
	if spare <= m.cfg.HighWatermark {
		m.holdEnd = time.Time{}
		return
	}
	m.holdEnd = t.Add(m.holdFor)
	m.holdTimer.Reset(m.holdFor)
}
