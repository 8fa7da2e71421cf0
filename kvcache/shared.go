package kvcache

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/internal/names"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// SharedConfig configures a SharedPool.
type SharedConfig struct {
	// Limit is the physical bytes all models together may map.
	Limit uint64
	// CompactOnPressure lets a model that needs memory, once the other models' free pages and
	// cache-only pages are taken, compact another model to free whole pages (a copy of that
	// model's scattered blocks: milliseconds on a GPU). Without it only free pages and pages
	// holding nothing but idle cached blocks are taken.
	CompactOnPressure bool
	// Split divides every model's cache among the pool's devices (NewSharedMulti); Limit is then
	// per device.
	Split Split
	// Ledger, when set, shares the limit with the models of other processes on the same GPU:
	// every model registered joins the ledger as a member under its name (unique over all
	// processes), the ledger's limit replaces Limit (which may then be 0), pages are acquired
	// from it, and other processes short of memory ask this pool's models for their free and
	// cached pages (and with CompactOnPressure, for a compaction). The pool borrows the ledger:
	// close the pool before the ledger. One device only: a ledger is one GPU's.
	Ledger *ledger.Ledger
}

// SharedPool puts several models' managers, one per model, on one device under one physical
// limit. Each model has its own arena (its own virtual reservation, so no model's blocks ever
// alias another's); the pages they map draw on one vmm.Budget, or on SharedConfig.Ledger. When a
// model needs a page and the budget is spent, the other models' free pages are reclaimed first,
// then their pages holding only idle cached blocks, then (with CompactOnPressure) other models
// are compacted, and only then does the append fail with ErrOutOfMemory. The limit can change at run time. Safe for concurrent use; the SharedPool owns
// the managers it registers and the Device is borrowed.
type SharedPool struct {
	devs    []vmm.Device
	budgets []budget // one per device: the limit is per GPU
	cfg     SharedConfig

	mu     sync.Mutex
	models map[string]*Manager
	closed bool
}

// NewShared returns an empty shared pool on dev.
func NewShared(dev vmm.Device, cfg SharedConfig) (*SharedPool, error) {
	if dev == nil {
		return nil, fmt.Errorf("kvcache: shared pool: %w: nil device", ErrInvalidArgument)
	}
	if cfg.Limit == 0 && cfg.Ledger == nil {
		return nil, fmt.Errorf("kvcache: shared pool: %w: zero limit", ErrInvalidArgument)
	}
	return NewSharedMulti([]vmm.Device{dev}, cfg)
}

// NewSharedMulti returns an empty shared pool on several devices: every model registered is
// divided among them by cfg.Split (see NewMulti), and each device has its own budget of
// cfg.Limit bytes (a limit per GPU), reclaimed from the other models' shares on that device.
func NewSharedMulti(devs []vmm.Device, cfg SharedConfig) (*SharedPool, error) {
	if len(devs) == 0 || len(devs) != cfg.Split.devices() {
		return nil, fmt.Errorf("kvcache: shared pool: %w: %d devices for a split of %d", ErrInvalidArgument, len(devs), cfg.Split.devices())
	}
	for i, d := range devs {
		if d == nil {
			return nil, fmt.Errorf("kvcache: shared pool: %w: device %d is nil", ErrInvalidArgument, i)
		}
	}
	s := &SharedPool{devs: append([]vmm.Device(nil), devs...), cfg: cfg, models: make(map[string]*Manager)}
	if cfg.Ledger != nil {
		if len(devs) != 1 {
			return nil, fmt.Errorf("kvcache: shared pool: %w: a ledger is one GPU's, the pool has %d devices", ErrInvalidArgument, len(devs))
		}
		if _, err := cfg.Ledger.Snapshot(); err != nil {
			return nil, fmt.Errorf("kvcache: shared pool: %w", err)
		}
		s.budgets = []budget{ledgerBudget{l: cfg.Ledger, allowCompact: cfg.CompactOnPressure}}
		return s, nil
	}
	if cfg.Limit == 0 {
		return nil, fmt.Errorf("kvcache: shared pool: %w: zero limit", ErrInvalidArgument)
	}
	for range devs {
		s.budgets = append(s.budgets, procBudget{vmm.NewBudget(cfg.Limit)})
	}
	return s, nil
}

// Register creates the manager of a model: cfg.Capacity is its virtual capacity (it costs no
// physical memory); the pages it maps count against the shared limit. Names are unique
// (ErrExists). A name is 1 to 63 bytes of valid UTF-8 with no control character (a *NameError
// otherwise), as a ledger member's is: a pool with a Ledger joins it under the model's name.
func (s *SharedPool) Register(name string, cfg Config) (*Manager, error) {
	return s.register(name, cfg, nil)
}

// register is Register; with mu, the model's manager takes mu as its lock (the groups of a
// Hybrid share one).
func (s *SharedPool) register(name string, cfg Config, mu *sync.Mutex) (*Manager, error) {
	return s.registerSplit(name, cfg, mu, nil)
}

// registerSplit is register; page, if set, chooses each device's page when the pool divides the
// model among several (a Hybrid's group, NewHybridMulti).
func (s *SharedPool) registerSplit(name string, cfg Config, mu *sync.Mutex, page sharePage) (*Manager, error) {
	if err := s.check("register"); err != nil {
		return nil, err
	}
	if err := names.Check("model", name); err != nil {
		return nil, fmt.Errorf("kvcache: register: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("kvcache: register %q: %w", name, ErrClosed)
	}
	if _, ok := s.models[name]; ok {
		return nil, fmt.Errorf("kvcache: register %q: %w", name, ErrExists)
	}
	join := func(m *Manager, d int, e *elastic) error {
		if limit := s.budgets[d].Limit(); limit < e.cfg.PageSize { // the limit and e's page are one device's
			return &ConfigError{Field: "SharedConfig.Limit", Value: limit,
				Reason: fmt.Sprintf("is less than one page of %d bytes (PageSize), so the model could hold no block", e.cfg.PageSize)}
		}
		// A ledger's member starts goroutines that call m at once (Stats, Reclaim): m takes
		// its name and lock first, and holds the lock until its backing has the account.
		m.name, m.shared = name, true
		if mu != nil {
			m.mu = mu // nothing has locked its own yet
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		member, err := s.budgets[d].join(name, m)
		if err != nil {
			return err
		}
		e.member, e.compactOthers = member, s.cfg.CompactOnPressure
		return nil
	}
	var m *Manager
	var err error
	if len(s.devs) == 1 {
		m, err = newManager(s.devs[0], cfg, func(m *Manager, e *elastic) error { return join(m, 0, e) })
	} else {
		m, err = newMulti(s.devs, cfg, s.cfg.Split, join, page)
	}
	if err != nil {
		return nil, fmt.Errorf("kvcache: register %q: %w", name, err)
	}
	s.models[name] = m
	return m, nil
}

// Model returns the manager registered under name (ErrNotFound otherwise).
func (s *SharedPool) Model(name string) (*Manager, error) {
	if err := s.check("model " + name); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("kvcache: model %q: %w", name, ErrClosed)
	}
	m, ok := s.models[name]
	if !ok {
		return nil, fmt.Errorf("kvcache: model %q: %w", name, ErrNotFound)
	}
	return m, nil
}

// Unregister closes the model's manager, which returns all its memory to the device and the
// budget. Closing a registered manager directly returns its memory too; Unregister then only
// forgets the name. When the device fails to take memory back, the model stays registered, its
// pages still counted, and a later Unregister tries again.
func (s *SharedPool) Unregister(name string) error {
	if err := s.check("unregister " + name); err != nil {
		return err
	}
	s.mu.Lock()
	m, ok := s.models[name]
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return fmt.Errorf("kvcache: unregister %q: %w", name, ErrClosed)
	}
	if !ok {
		return fmt.Errorf("kvcache: unregister %q: %w", name, ErrNotFound)
	}
	if err := closeModel(m); err != nil {
		return err
	}
	s.mu.Lock()
	if s.models[name] == m {
		delete(s.models, name)
	}
	s.mu.Unlock()
	return nil
}

// closeModel closes a registered manager; one the caller closed already is fine.
func closeModel(m *Manager) error {
	if err := m.Close(); err != nil && !errors.Is(err, ErrClosed) {
		return err
	}
	return nil
}

// LimitReport says how far a change of the limit got.
type LimitReport struct {
	Limit uint64
	Used  uint64 // bytes the models hold after shrinking
	// Shortfall is Used - Limit when the models' live data needs more than the new limit (they
	// keep it; no new page is mapped until usage falls under the limit), else 0.
	Shortfall uint64
}

// SetLimit changes the shared limit (on several devices, each device's; with a Ledger, the
// ledger's, for every process at once). Lowering it below what the models hold shrinks them:
// free pages and pages holding only idle cached blocks are returned first, then the models are
// compacted, as far as their live data allows. Through a ledger, only the models of pools with
// CompactOnPressure are compacted. The report gives the most any device uses. A limit that is
// not positive is ErrInvalidArgument and changes nothing, as does a ledger that refuses the
// change (closed or damaged: its error is returned).
func (s *SharedPool) SetLimit(limit int64) (LimitReport, error) {
	if err := s.check("set limit"); err != nil {
		return LimitReport{}, err
	}
	if limit <= 0 {
		return LimitReport{}, fmt.Errorf("kvcache: set limit %d: %w", limit, ErrInvalidArgument)
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return LimitReport{}, fmt.Errorf("kvcache: set limit: %w", ErrClosed)
	}
	used := uint64(0)
	for _, b := range s.budgets {
		u, err := b.setLimit(uint64(limit))
		if err != nil { // only a ledger fails, and a pool with a ledger has one budget
			return LimitReport{}, fmt.Errorf("kvcache: set limit: %w", err)
		}
		used = max(used, u)
	}
	r := LimitReport{Limit: uint64(limit), Used: used}
	if used > uint64(limit) {
		r.Shortfall = used - uint64(limit)
	}
	return r, nil
}

// ModelStats is one model's share.
type ModelStats struct {
	Name         string
	VirtualBytes uint64 // its arena's reservation
	Stats
}

// SharedStats is a snapshot of the pool. Limit and Used are per device: on several devices
// Used is the most any device uses, and Devices gives each.
type SharedStats struct {
	Limit, Used uint64
	Devices     []DeviceUse
	Models      []ModelStats // by name
}

// DeviceUse is one device's budget in a shared pool.
type DeviceUse struct {
	Name        string
	Limit, Used uint64
}

// Stats returns the global and per-model figures.
func (s *SharedPool) Stats() SharedStats {
	if s.check("stats") != nil {
		return SharedStats{}
	}
	s.mu.Lock()
	ms := make([]*Manager, 0, len(s.models))
	for _, m := range s.models {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	st := SharedStats{Limit: s.budgets[0].Limit()}
	for i, b := range s.budgets {
		st.Devices = append(st.Devices, DeviceUse{Name: s.devs[i].Info().Name, Limit: b.Limit(), Used: b.Used()})
		st.Used = max(st.Used, b.Used())
	}
	for _, m := range ms {
		st.Models = append(st.Models, ModelStats{Name: m.name, VirtualBytes: m.cfg.Capacity, Stats: m.Stats()})
	}
	slices.SortFunc(st.Models, func(a, b ModelStats) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return st
}

// check reports whether s is a pool made by NewShared.
func (s *SharedPool) check(op string) error {
	if s == nil || len(s.budgets) == 0 {
		return fmt.Errorf("kvcache: shared pool: %s: %w: nil pool, or one not made by NewShared", op, ErrInvalidArgument)
	}
	return nil
}

// Close unregisters every model; a second Close returns ErrClosed. A model whose memory the
// device did not take back (the error says so) keeps it counted until its Manager's Close
// succeeds.
func (s *SharedPool) Close() error {
	if err := s.check("close"); err != nil {
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("kvcache: shared pool: %w", ErrClosed)
	}
	s.closed = true
	ms := s.models
	s.models = nil
	s.mu.Unlock()
	var errs []error
	for _, m := range ms {
		errs = append(errs, closeModel(m))
	}
	return errors.Join(errs...)
}

// Reclaim implements vmm.Reclaimer for the shared budget: it unmaps free pages from the top,
// then evicts and unmaps the pages that hold only idle cached blocks, oldest first, until need
// bytes are returned. With compact, when those were not enough, it then compacts the live
// blocks and returns the pages that come free. With wait false it returns 0 at once if the manager is busy. A sleeping or
// standalone manager may be asked too.
func (m *Manager) Reclaim(need uint64, compact, wait bool) uint64 {
	freed, _ := m.reclaim(need, compact, wait)
	return freed
}

// TryReclaim implements vmm.TryReclaimer: Reclaim without waiting, reporting whether the
// manager was busy (so that the budget asks again) rather than out of memory to give.
func (m *Manager) TryReclaim(need uint64, compact bool) (freed uint64, busy bool) {
	return m.reclaim(need, compact, false)
}

func (m *Manager) reclaim(need uint64, compact, wait bool) (uint64, bool) {
	if !m.made() {
		return 0, false
	}
	if wait {
		m.growMu.Lock()
		m.mu.Lock()
	} else {
		if !m.growMu.TryLock() {
			return 0, true
		}
		if !m.mu.TryLock() {
			m.growMu.Unlock()
			return 0, true
		}
	}
	defer m.growMu.Unlock()
	defer m.mu.Unlock()
	if m.closed || m.static {
		return 0, false
	}
	freed := m.unmapFreeLocked(need) // bytes of one device: a budget is one device's
	if freed < need && compact && m.arena.Live() > 0 {
		// The compaction returns the pages it empties itself: they count even when returning a
		// later one fails.
		res, err := m.compactLocked(CompactOptions{}, m.arena.FreePages())
		freed += uint64(res.PagesReleased) * m.geom.PageSize
		if err == nil && freed < need {
			freed += m.unmapFreeLocked(need - freed)
		}
	}
	m.publish()
	return freed, false
}

// unmapFreeLocked unmaps free pages from the top until need bytes are returned, then evicts and
// unmaps cache-only pages, oldest first: another model's need outranks this one's cache.
func (m *Manager) unmapFreeLocked(need uint64) uint64 {
	freed := uint64(0)
	for freed < need && (m.arena.FreePages() > 0 || m.arena.CacheOnlyPages() > 0) {
		if m.arena.FreePages() == 0 {
			p, _ := m.arena.OldestCacheOnly()
			m.evictPage(p, false)
		}
		p, _ := m.arena.HighestFree()
		if err := m.unmapPage(p); err != nil {
			break
		}
		m.counters.unmaps++
		m.arena.SetState(p, arena.Unmapped)
		freed += m.geom.PageSize // a page index frees one page on every device
	}
	return freed
}

// SleepResult says what Sleep returned.
type SleepResult struct {
	CompactResult
	PagesMapped int // pages still mapped for live data
}

// Sleep returns every page the manager does not need for its live data: it drops the prefix
// cache, compacts the live blocks into the fewest pages and unmaps every free page, and with no
// live sequences that is everything. Until Wake, appends, starts, admissions and swaps in fail
// with ErrAsleep and no reserve is kept; frees, forks, truncates, swaps out and exports still work. Static memory
// is never returned.
func (m *Manager) Sleep() (SleepResult, error) {
	if !m.made() {
		return SleepResult{}, notMadeCall("sleep")
	}
	m.growMu.Lock()
	defer m.growMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return SleepResult{}, fmt.Errorf("kvcache: sleep: %w", ErrClosed)
	}
	m.asleep = true
	m.dropCacheLocked()
	res, err := m.compactLocked(CompactOptions{}, 0)
	r := SleepResult{CompactResult: res, PagesMapped: m.arena.Mapped()}
	if err != nil {
		return r, fmt.Errorf("kvcache: sleep: %w", err)
	}
	return r, nil
}

// Wake makes a sleeping manager usable again and refills its reserve in the background (or at
// the next append or Settle with NoBackground).
func (m *Manager) Wake() error {
	if !m.made() {
		return notMadeCall("wake")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("kvcache: wake: %w", ErrClosed)
	}
	m.asleep = false
	m.kick()
	return nil
}

// Asleep reports whether the manager sleeps.
func (m *Manager) Asleep() bool {
	if !m.made() {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.asleep
}
