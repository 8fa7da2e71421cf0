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

func (m *Manager) settle() error {
	m.growMu.Lock()
	defer m.growMu.Unlock()
	var errs []error
	for {
		m.mu.Lock()
		if m.closed || m.static || m.asleep || m.spare() >= m.cfg.ReservePages {
			m.mu.Unlock()
			break
		}
		if err := m.checkLimit(); err != nil {
			m.mu.Unlock()
			break // the limit is a bound, not a failure of the reserve
		}
		p, ok := m.arena.TakeUnmapped()
		if !ok {
			m.mu.Unlock()
			break
		}
		m.inflight++
		m.mu.Unlock()

		err := m.mapPage(p, false) // the reserve never takes memory from other models

		m.mu.Lock()
		m.inflight--
		if err != nil {
			m.arena.SetState(p, arena.Unmapped)
			m.mu.Unlock()
			if !errors.Is(err, ErrOutOfMemory) { // a spent budget bounds the reserve; it is no failure
				errs = append(errs, fmt.Errorf("kvcache: reserve page %d: %w", p, err))
			}
			break
		}
		m.counters.bgMaps++
		m.arena.MarkMapped(p)
		m.mu.Unlock()
	}
	for {
		m.mu.Lock()
		if !m.closed && !m.static {
			m.dropOverBound(m.cfg.HighWatermark)
			m.publish()
		}
		if m.closed || m.static || m.arena.FreePages() == 0 || m.spare() <= m.cfg.HighWatermark {
			m.mu.Unlock()
			break
		}
		p, _ := m.arena.HighestFree()
		m.arena.SetState(p, arena.InFlight)
		m.inflight++
		m.mu.Unlock()

		err := m.unmapPage(p)

		m.mu.Lock()
		m.inflight--
		if err != nil {
			m.arena.MarkMapped(p)
			m.mu.Unlock()
			errs = append(errs, fmt.Errorf("kvcache: return page %d: %w", p, err))
			break
		}
		m.counters.unmaps++
		m.arena.SetState(p, arena.Unmapped)
		m.mu.Unlock()
	}
	return errors.Join(errs...)
}
