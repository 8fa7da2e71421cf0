package kvcache

import "github.com/pagedkv/pagedkv/vmm"

// account is one model's share of a budget on one device: every page its elastic backing maps
// is acquired here first and released after the unmap. A *vmm.BudgetMember is one inside a
// process.
type account interface {
	Acquire(n uint64, compact bool) error
	TryAcquire(n uint64) error
	Release(n uint64)
	Headroom() uint64
	Used() uint64
	Leave()
}

// budget is the limit a SharedPool's models on one device share: a *vmm.Budget inside one
// process (procBudget).
type budget interface {
	// join opens m's account under name; m is asked to give memory back through Reclaim.
	join(name string, m *Manager) (account, error)
	// SetLimit changes the limit, shrinking the members as far as their live data allows, and
	// returns the bytes they hold after.
	SetLimit(limit uint64) (used uint64)
	Limit() uint64
	Used() uint64
}

// procBudget is a budget inside one process.
type procBudget struct{ *vmm.Budget }

func (b procBudget) join(name string, m *Manager) (account, error) { return b.Join(name, m) }
