package kvcache

import (
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// account is one model's share of a budget on one device: every page its elastic backing maps
// is acquired here first and released after the unmap. A *vmm.BudgetMember is one inside a
// process, a *ledger.Member one across processes.
type account interface {
	Acquire(n uint64, compact bool) error
	TryAcquire(n uint64) error
	Release(n uint64)
	Headroom() uint64
	Used() uint64
	Leave()
}

// budget is the limit a SharedPool's models on one device share: a *vmm.Budget inside one
// process (procBudget), or a ledger file across processes (ledgerBudget).
type budget interface {
	// join opens m's account under name; m is asked to give memory back through Reclaim.
	join(name string, m *Manager) (account, error)
	// setLimit changes the limit, shrinking the members as far as their live data allows, and
	// returns the bytes they hold after; an error means the limit did not change.
	setLimit(limit uint64) (used uint64, err error)
	Limit() uint64
	Used() uint64
}

// procBudget is a budget inside one process.
type procBudget struct{ *vmm.Budget }

func (b procBudget) join(name string, m *Manager) (account, error) { return b.Join(name, m) }

func (b procBudget) setLimit(limit uint64) (uint64, error) { return b.SetLimit(limit), nil }

// ledgerBudget is a budget shared with other processes through a ledger file.
type ledgerBudget struct {
	l            *ledger.Ledger
	allowCompact bool
}

func (b ledgerBudget) join(name string, m *Manager) (account, error) {
	return b.l.Join(name, ledgerHolder{m}, ledger.JoinOptions{AllowCompact: b.allowCompact})
}

// setLimit passes on the ledger's error (a closed or damaged ledger): the limit is then not set.
func (b ledgerBudget) setLimit(limit uint64) (uint64, error) {
	r, err := b.l.SetLimit(limit)
	if err != nil {
		return 0, err
	}
	return r.Used, nil
}

func (b ledgerBudget) Limit() uint64 { return b.l.Limit() }
func (b ledgerBudget) Used() uint64  { return b.l.Used() }

// ledgerHolder answers other processes' requests for a manager.
type ledgerHolder struct{ m *Manager }

func (h ledgerHolder) Reclaim(need uint64, compact, wait bool) uint64 {
	return h.m.Reclaim(need, compact, wait)
}

func (h ledgerHolder) TryReclaim(need uint64, compact bool) (uint64, bool) {
	return h.m.TryReclaim(need, compact)
}

func (h ledgerHolder) DropCache() { h.m.DropCache() }

func (h ledgerHolder) Usage() ledger.Usage {
	s := h.m.Stats()
	return ledger.Usage{
		Sequences: s.Sequences, LiveBlocks: s.LiveBlocks, MappedPages: s.MappedPages,
		QueryTokens: s.Prefix.QueryTokens, HitTokens: s.Prefix.HitTokens, CachedBlocks: s.Prefix.CachedBlocks,
		PageOverhead: s.PageOverhead,
	}
}
