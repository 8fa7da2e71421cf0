package vmm

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/names"
)

// Reclaimer is what a Budget member implements so that the budget can take memory back from it
// for another member.
type Reclaimer interface {
	// Reclaim gives back up to need bytes of memory the member holds but does not need for live
	// data (its reserve of free pages), and with compact also what a compaction of its live data
	// frees. It releases what it gives back through its BudgetMember and returns the bytes. With
	// wait false it must not block on the member's locks (it is called while another member holds
	// its own): it gives back nothing if the member is busy.
	Reclaim(need uint64, compact, wait bool) uint64
}

// TryReclaimer is a Reclaimer that can say it was busy: TryReclaim gives back what it can
// without waiting for the member's locks, and reports busy when it could not take them. A
// budget asks a busy member again after a short pause and moves on at once from one that had
// nothing to give; a plain Reclaimer asked without waiting is treated as possibly busy.
type TryReclaimer interface {
	Reclaimer
	TryReclaim(need uint64, compact bool) (freed uint64, busy bool)
}

// ReclaimNow asks r for up to need bytes without waiting for its locks, and reports whether it
// may have been busy (always, for a Reclaimer that is not a TryReclaimer). A nil r gives nothing.
func ReclaimNow(r Reclaimer, need uint64, compact bool) (freed uint64, busy bool) {
	if r == nil {
		return 0, false
	}
	if t, ok := r.(TryReclaimer); ok {
		return t.TryReclaim(need, compact)
	}
	return r.Reclaim(need, compact, false), true
}

// Budget is one limit on the physical memory that several owners map, one per model sharing a
// GPU, say. Owners join as BudgetMembers and acquire bytes before mapping them; when the budget
// is spent, Acquire first reclaims from the other members (their free reserves, then, if asked,
// their compactions) before failing with a *CapacityError. The limit can change at run time.
// Safe for concurrent use.
type Budget struct {
	mu      sync.Mutex
	limit   uint64
	used    uint64
	members map[string]*BudgetMember
}

// BudgetMember is one owner's account in a Budget.
type BudgetMember struct {
	b    *Budget
	name string
	used uint64
	r    Reclaimer
	gone bool
}

// NewBudget returns a budget of limit bytes.
func NewBudget(limit uint64) *Budget {
	return &Budget{limit: limit, members: make(map[string]*BudgetMember)}
}

// Join adds a member. Names are unique (ErrExists otherwise) and are 1 to 63 bytes of valid
// UTF-8 with no control character (a *NameError otherwise); r may not be nil.
func (b *Budget) Join(name string, r Reclaimer) (*BudgetMember, error) {
	if b == nil || b.members == nil {
		return nil, fmt.Errorf("budget: join: %w: nil budget, or one not made by NewBudget", ErrInvalidArgument)
	}
	if err := names.Check("member", name); err != nil {
		return nil, fmt.Errorf("budget: join: %w", err)
	}
	if r == nil {
		return nil, fmt.Errorf("budget: join %q: %w: nil reclaimer", name, ErrInvalidArgument)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.members[name]; ok {
		return nil, fmt.Errorf("budget: member %q: %w", name, ErrExists)
	}
	m := &BudgetMember{b: b, name: name, r: r}
	b.members[name] = m
	return m, nil
}

// made reports whether m was made by Budget.Join.
func (m *BudgetMember) made() bool { return m != nil && m.b != nil }

var errMemberNotMade = fmt.Errorf("budget: %w: nil member, or one not made by Join", ErrInvalidArgument)

// Leave removes the member; whatever it still holds is released. Leaving twice is a no-op.
func (m *BudgetMember) Leave() {
	if !m.made() {
		return
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if m.gone {
		return
	}
	m.b.used -= m.used
	m.used = 0
	m.gone = true
	delete(m.b.members, m.name)
}

// Name returns the member's name.
func (m *BudgetMember) Name() string {
	if !m.made() {
		return ""
	}
	return m.name
}

// Used returns the bytes the member holds.
func (m *BudgetMember) Used() uint64 {
	if !m.made() {
		return 0
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	return m.used
}

// TryAcquire takes n bytes if they are free now, reclaiming nothing. A member that left gets
// ErrClosed.
func (m *BudgetMember) TryAcquire(n uint64) error {
	if !m.made() {
		return errMemberNotMade
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if m.gone {
		return fmt.Errorf("budget: member %q left: %w", m.name, ErrClosed)
	}
	return m.takeLocked(n)
}

func (m *BudgetMember) takeLocked(n uint64) error {
	b := m.b
	if checked.Over(b.used, n, b.limit) > 0 {
		free := uint64(0)
		if b.limit > b.used {
			free = b.limit - b.used
		}
		return &CapacityError{Need: n, Free: free}
	}
	b.used += n
	m.used += n
	return nil
}

// Acquire takes n bytes, reclaiming from the other members when the budget is spent: first
// their free reserves, then, with compact, their compactions. The caller may hold its own
// locks: other members are asked without waiting for theirs. It fails with a *CapacityError
// (ErrOutOfMemory) naming the bytes asked for and free. When n would not fit even if the others
// gave back all they hold, it fails at once and takes nothing from them.
func (m *BudgetMember) Acquire(n uint64, compact bool) error {
	err := m.TryAcquire(n)
	if err == nil || !errors.Is(err, ErrOutOfMemory) || m.beyondOthers(n) {
		return err
	}
	passes := []bool{false}
	if compact {
		passes = append(passes, true)
	}
	for _, withCompaction := range passes {
		for attempt := range 3 { // a member busy in a short operation is asked again
			_, busy := m.b.reclaimFrom(m, n, withCompaction, false)
			if err = m.TryAcquire(n); err == nil {
				return nil
			}
			if !busy {
				break // nobody had more to give
			}
			time.Sleep(time.Duration(attempt+1) * 20 * time.Microsecond)
		}
	}
	return err
}

// beyondOthers reports whether n more would exceed the limit with only the member's own bytes
// held: then no reclaim from the others can make room.
func (m *BudgetMember) beyondOthers(n uint64) bool {
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	return checked.Over(m.used, n, m.b.limit) > 0
}

// Headroom returns the bytes the member could acquire now without reclaiming from others: the
// budget's limit less what all members hold (0 when they hold it all, or more).
func (m *BudgetMember) Headroom() uint64 {
	if !m.made() {
		return 0
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if m.b.used >= m.b.limit {
		return 0
	}
	return m.b.limit - m.b.used
}

// Release returns n bytes (at most what the member holds).
func (m *BudgetMember) Release(n uint64) {
	if !m.made() {
		return
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if n > m.used {
		n = m.used
	}
	m.used -= n
	m.b.used -= n
}

// others returns the members other than skip, largest holders first.
func (b *Budget) others(skip *BudgetMember) []*BudgetMember {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]*BudgetMember, 0, len(b.members))
	for _, o := range b.members {
		if o != skip {
			out = append(out, o)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].used != out[j].used {
			return out[i].used > out[j].used
		}
		return out[i].name < out[j].name
	})
	return out
}

// reclaimFrom asks the other members for the bytes that n more would exceed the limit by, and
// reports whether one of them may have been too busy to answer (only without wait).
func (b *Budget) reclaimFrom(skip *BudgetMember, n uint64, compact, wait bool) (got uint64, busy bool) {
	for _, o := range b.others(skip) {
		b.mu.Lock()
		need := checked.Over(b.used, n, b.limit)
		b.mu.Unlock()
		if need == 0 {
			break
		}
		if wait {
			got += o.r.Reclaim(need, compact, true)
			continue
		}
		freed, wasBusy := ReclaimNow(o.r, need, compact)
		got, busy = got+freed, busy || wasBusy
	}
	return got, busy
}

// Limit returns the limit.
func (b *Budget) Limit() uint64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit
}

// Used returns the bytes held by all members.
func (b *Budget) Used() uint64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// SetLimit changes the limit. Lowering it below what the members hold takes memory back from
// them (reserves, then compactions), waiting for them as needed; what live data still needs
// stays held, and the returned Used says how far it got (the limit is enforced on every new
// Acquire either way).
func (b *Budget) SetLimit(limit uint64) (used uint64) {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	b.limit = limit
	over := b.used > limit
	b.mu.Unlock()
	if over {
		for _, compact := range []bool{false, true} {
			b.reclaimFrom(nil, 0, compact, true)
		}
	}
	return b.Used()
}
