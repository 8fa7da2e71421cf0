package kvcache

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// A Hybrid's tiers below the host (HybridConfig.Tiers) are each group's own, as a Manager's
// (tiers.go): a group writes behind what its host prefix cache takes, and a start fetches
// into a group's host cache what its tiers hold, before it takes the lock; the lookup then
// brings those blocks to the devices as host hits (hybridhost.go). What a group fetches
// follows the hit rule: the unbounded groups (full attention, MLA) their leading runs first,
// which with the recurrent groups' cached checkpoints bound the hit (tierBound; with no
// unbounded group, the window and chunk groups' runs, reachBound); then each window or chunk
// group the blocks its next token reads at that length, and its sink blocks.
// No fetch evicts a host block the start reads from the host (fetchRoom). A tier that misses
// or fails leaves the hit shorter, never wrong.

// groupTiers returns gc with group i's tiers from cfg.Tiers, where the group has a host prefix
// cache; a *ConfigError where they do not fit the group.
func groupTiers(i int, g LayerGroup, cfg HybridConfig, gc Config) (Config, error) {
	if cfg.Tiers == nil || !gc.HostPrefixCache {
		return gc, nil
	}
	tiers, err := cfg.Tiers(i, g, groupFingerprint(gc, g), int(gc.BlockStride()))
	if err != nil {
		return gc, fmt.Errorf("tiers: %w", err)
	}
	gc.Tiers, gc.TierTimeout = tiers, cfg.TierTimeout
	return gc, gc.Validate()
}

// groupFingerprint is the fingerprint of group g's blocks as its tiers store them: its arena's
// layout (Config.Fingerprint), which layers of the model they hold, for what attention, and
// how their elements encode (the dtype, an fp8 group's scales). Two groups of one shape
// (gpt-oss's full and window layers) share a layout and a key chain, but never their blocks: a
// store shared by both (a Redis server, whose keys carry the fingerprint) keeps them apart,
// and a block of one is never served as the other's.
func groupFingerprint(gc Config, g LayerGroup) tier.Fingerprint {
	base := gc.Fingerprint()
	h := sha256.New()
	h.Write([]byte("pagedkv group v1\x00"))
	h.Write(base[:])
	var b [8]byte
	put := func(v int) {
		binary.LittleEndian.PutUint64(b[:], uint64(v))
		h.Write(b[:])
	}
	put(int(g.Kind))
	put(g.Window)
	put(g.Sinks)
	put(g.RopeDim)
	put(int(g.DType)) // bf16 and f16, e4m3 and e5m2 have one size each
	put(len(g.Layers))
	for _, l := range g.Layers {
		put(l)
	}
	for _, scales := range [][]float32{g.KScales, g.VScales} { // fp8 values mean nothing without them
		put(len(scales))
		for _, v := range scales {
			put(int(math.Float32bits(v)))
		}
	}
	var fp tier.Fingerprint
	h.Sum(fp[:0])
	return fp
}

// fetchTiers brings from the groups' tiers into their host caches the blocks of p (keys: each
// group's chain) that a start of seq would read and only the tiers hold. A start that would
// fail (seq exists, a closed or sleeping Hybrid) returns its error first and asks no tier. The
// lock is not held.
func (h *Hybrid) fetchTiers(seq SeqID, p Prompt, keys [][]prefix.Key) error {
	if !h.tiered() {
		return nil
	}
	h.mu.Lock()
	for i, m := range h.groups {
		if err := m.checkStart(seq); err != nil {
			h.mu.Unlock()
			return h.groupErr(i, err)
		}
	}
	h.mu.Unlock()
	if hit := h.tierBound(p, keys); hit > 0 {
		for i, m := range h.groups {
			if !m.bounded() || m.tiers == nil {
				continue
			}
			bt := m.cfg.BlockTokens
			n := min(len(keys[i]), hit/bt)
			first := m.reachFrom(n*bt) / bt
			sinks, reach := keys[i][:min(m.sinkBlocks(), first)], keys[i][first:n]
			m.fetchKeys(p.Namespace, sinks, sinks, reach)
			m.fetchKeys(p.Namespace, reach, sinks, reach)
		}
	}
	return nil
}

// tierBound fetches the unbounded groups' (full attention, MLA) leading runs from their tiers
// and returns the hit they and the recurrent groups' cached checkpoints allow, in tokens: a
// length every group can end at, as agree finds it. The bound is taken again until it holds,
// as one group's shorter run moves the others' ends; a window or chunk group then fetches only
// what its next token reads there. Without an unbounded group, reachBound bounds it. A
// recurrent group's checkpoints never leave the device: without one cached there, it is 0 and
// nothing is fetched.
func (h *Hybrid) tierBound(p Prompt, keys [][]prefix.Key) int {
	step := 1 // the least common multiple of every group's block (or checkpoint) tokens
	for _, m := range h.groups {
		if kt := m.keyTokens(); kt > 0 {
			step = lcm(step, kt)
		}
	}
	hit := maxPromptBlocks(len(p.Tokens), step) * step
	runs := false // an unbounded group's leading run bounds the hit
	for _, m := range h.groups {
		runs = runs || m.cfg.StateBytes == 0 && !m.bounded() && m.hostCaching()
	}
	for prev := -1; hit > 0 && hit != prev; {
		prev = hit
		for i, m := range h.groups { // the checkpoints first: they cost no I/O
			if m.cfg.StateBytes > 0 {
				hit = min(hit, m.checkpointHeld(keys[i], hit)) / step * step
			}
		}
		for i, m := range h.groups {
			if hit == 0 || m.cfg.StateBytes > 0 || m.bounded() || !m.hostCaching() {
				continue
			}
			n := min(len(keys[i]), hit/m.cfg.BlockTokens)
			if m.tiers != nil {
				m.fetchKeys(p.Namespace, keys[i][:n], keys[i][:n])
			}
			held, _ := m.cachedAnywhere(keys[i][:n])
			hit = min(hit, held*m.cfg.BlockTokens) / step * step
		}
		if !runs && hit > 0 {
			hit = h.reachBound(p.Namespace, keys, hit, step)
		}
	}
	return hit
}

// reachBound returns the hit, at most hit, that the window and chunk groups of a Hybrid with
// no unbounded group to bound it can serve from their devices, hosts and tiers: hit itself when
// each holds the blocks its next token reads there (sinks and reach: a repeated prompt), else
// what the groups' leading runs allow (a longer prompt's prefix). It reads no block: the tiers
// answer Has. A run cut short, where a store dropped a prompt's first blocks and kept later
// ones, gives a shorter hit than the blocks allow, never a wrong one.
func (h *Hybrid) reachBound(ns prefix.Namespace, keys [][]prefix.Key, hit, step int) int {
	reachable := true
	for i, m := range h.groups {
		if !m.bounded() || !m.hostCaching() {
			continue
		}
		n := min(len(keys[i]), hit/m.cfg.BlockTokens)
		first := m.reachFrom(n*m.cfg.BlockTokens) / m.cfg.BlockTokens
		sinks, reach := keys[i][:min(m.sinkBlocks(), first)], keys[i][first:n]
		if m.heldRun(ns, sinks) < len(sinks) || m.heldRun(ns, reach) < len(reach) {
			reachable = false
			break
		}
	}
	if reachable {
		return hit
	}
	for i, m := range h.groups {
		if !m.bounded() || !m.hostCaching() {
			continue
		}
		n := min(len(keys[i]), hit/m.cfg.BlockTokens)
		hit = min(hit, m.heldRun(ns, keys[i][:n])*m.cfg.BlockTokens) / step * step
	}
	return hit
}

// heldRun returns how many of keys, from the first, are held in one run by the device or the
// host and then by the tiers in turn (each tier's Has from where the run ends so far), reading
// no block. A tier that fails ends the run where it was (counted in its Failures).
func (m *Manager) heldRun(ns prefix.Namespace, keys []prefix.Key) int {
	at, _ := m.cachedAnywhere(keys)
	t := m.tiers
	if t == nil {
		return at
	}
	for i, tr := range t.tiers {
		if at == len(keys) {
			break
		}
		var n int
		err := m.tierCall(func(ctx context.Context) error {
			var err error
			n, err = tr.Store.Has(ctx, ns, keys[at:])
			return err
		})
		if err != nil {
			m.mu.Lock()
			t.counters[i].Failures++
			m.mu.Unlock()
		}
		at += max(0, min(n, len(keys)-at)) // a hint, and a store's count is not trusted past the keys asked
	}
	return at
}

func lcm(a, b int) int {
	x, y := a, b
	for y != 0 {
		x, y = y, x%y
	}
	return a / x * b
}

// fetchKeys is fetchRun of keys for a start of a Hybrid, keeping the host's blocks of keep:
// one fetch of the group at a time, its blocks marked as the tier's until a start's hit reads
// them.
func (m *Manager) fetchKeys(ns prefix.Namespace, keys []prefix.Key, keep ...[]prefix.Key) {
	if len(keys) == 0 {
		return
	}
	t := m.tiers
	t.fetchMu <- struct{}{}
	defer func() { <-t.fetchMu }()
	m.fetchRun(ns, keys, true, keep...)
}

// checkpointHeld returns the tokens of the latest checkpoint among keys (a recurrent group's
// chain) that the device caches, at most limit; 0 for none.
func (m *Manager) checkpointHeld(keys []prefix.Key, limit int) int {
	ct := m.cfg.CheckpointTokens
	if ct == 0 {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0
	}
	for j := min(len(keys), limit/ct) - 1; j >= 0; j-- {
		if m.arena.Index().Get(keys[j]) != nil {
			return (j + 1) * ct
		}
	}
	return 0
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
