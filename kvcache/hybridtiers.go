package kvcache

import (
	"context"
	"fmt"

	"github.com/pagedkv/pagedkv/prefix"
)

// A Hybrid's tiers below the host (HybridConfig.Tiers) are each group's own, as a Manager's
// (tiers.go): a group writes behind what its host prefix cache takes, and a start fetches
// into a group's host cache what its tiers hold, before it takes the lock; the lookup then
// brings those blocks to the devices as host hits (hybridhost.go). What a group fetches
// follows the hit rule: the unbounded groups (full attention, MLA) their leading runs first,
// which bound the hit; then each window or chunk group the blocks its next token reads at
// that length, and its sink blocks. A tier that misses or fails leaves the hit shorter, never
// wrong.

// groupTiers returns gc with group i's tiers from cfg.Tiers, where the group has a host prefix
// cache; a *ConfigError where they do not fit the group.
func groupTiers(i int, g LayerGroup, cfg HybridConfig, gc Config) (Config, error) {
	if cfg.Tiers == nil || !gc.HostPrefixCache {
		return gc, nil
	}
	tiers, err := cfg.Tiers(i, g, gc.Fingerprint(), int(gc.BlockStride()))
	if err != nil {
		return gc, fmt.Errorf("tiers: %w", err)
	}
	gc.Tiers = tiers
	return gc, gc.Validate()
}

// fetchTiers brings from the groups' tiers into their host caches the blocks of p (keys: each
// group's chain) that a longer hit would read and only the tiers hold. The lock is not held.
func (h *Hybrid) fetchTiers(p Prompt, keys [][]prefix.Key) {
	if !h.tiered() {
		return
	}
	hit := maxPromptBlocks(len(p.Tokens), 1) // tokens
	for i, m := range h.groups {
		if m.cfg.StateBytes > 0 || m.bounded() || !m.hostCaching() {
			continue
		}
		n := min(len(keys[i]), hit/m.cfg.BlockTokens)
		if m.tiers != nil {
			m.fetchKeys(p.Namespace, keys[i][:n])
		}
		held, _ := m.cachedAnywhere(keys[i][:n])
		hit = min(hit, held*m.cfg.BlockTokens)
	}
	for i, m := range h.groups {
		if !m.bounded() || m.tiers == nil {
			continue
		}
		bt := m.cfg.BlockTokens
		n := min(len(keys[i]), hit/bt)
		first := m.reachFrom(n*bt) / bt
		sinks := min(m.sinkBlocks(), first)
		m.fetchKeys(p.Namespace, keys[i][:sinks])
		m.fetchKeys(p.Namespace, keys[i][first:n])
	}
}

// fetchKeys is fetchRun for a start of a Hybrid: one fetch of the group at a time.
func (m *Manager) fetchKeys(ns prefix.Namespace, keys []prefix.Key) {
	if len(keys) == 0 {
		return
	}
	t := m.tiers
	t.fetchMu <- struct{}{}
	defer func() { <-t.fetchMu }()
	m.fetchRun(ns, keys)
}

// tiered reports whether any group has tiers below its host.
func (h *Hybrid) tiered() bool {
	for _, m := range h.groups {
		if m.tiers != nil {
			return true
		}
	}
	return false
}

// SyncTiers waits until every group has written to its tiers, or given up on, every block
// queued before the call (Manager.SyncTiers), or until ctx is done (its error). A runtime calls
// it before a planned exit, so that a restart finds what this process computed.
func (h *Hybrid) SyncTiers(ctx context.Context) error {
	if !h.made() {
		return fmt.Errorf("kvcache: hybrid: sync tiers: %w", errHybridNotMade)
	}
	for i, m := range h.groups {
		if err := m.SyncTiers(ctx); err != nil {
			return h.groupErr(i, err)
		}
	}
	return nil
}
