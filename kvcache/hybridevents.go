package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/prefix"
)

// eventGroup is what a Hybrid group's KV events say of the group, as vLLM's do for the groups
// of a hybrid model: its index (group_idx), its kind (kv_cache_spec_kind) and, for a sliding
// window, the window (kv_cache_spec_sliding_window). The zero eventGroup says nothing: a plain
// Manager's events have no group.
type eventGroup struct {
	set    bool
	idx    int
	kind   string
	window int
	all    []*Manager // every group of the Hybrid, which share one feed (and one lock)
}

// flushHeld hands the events that m, and every group sharing its feed, held back for their
// subscribers to those subscribers (a Subscribe does so first); the lock is held.
func (m *Manager) flushHeld() {
	if m.group.all == nil {
		m.flushEvents()
		return
	}
	for _, g := range m.group.all {
		g.flushEvents()
	}
}

// specKind names a group's kind as vLLM's KV cache specs do.
func specKind(g LayerGroup) string {
	switch {
	case g.RopeDim > 0:
		return "mla_attention"
	case g.Kind == SlidingWindow:
		return "sliding_window"
	case g.Kind == ChunkedAttention:
		return "chunked_local_attention"
	case g.Kind == RecurrentState:
		return "mamba"
	}
	return "full_attention"
}

// stored marks ev (a BlockStored) with the group's index, kind and window.
func (g *eventGroup) stored(ev *prefix.Event) {
	if g.set {
		ev.HasGroup, ev.Group, ev.GroupKind, ev.SlidingWindow = true, g.idx, g.kind, g.window
	}
}

// removed marks ev (a BlockRemoved or AllBlocksCleared) with the group's index.
func (g *eventGroup) removed(ev *prefix.Event) {
	if g.set {
		ev.HasGroup, ev.Group = true, g.idx
	}
}

// Subscribe returns a subscription to the KV events of every group, each event carrying its
// group's index, kind and window (prefix.Event.Group, GroupKind, SlidingWindow), in the order
// of their effects within each group. Keys of different groups are different blocks: a window
// group caches its own. It gets the events of operations after Subscribe. Pass it to
// kvevents.Start for the routers of a fleet. Close the subscription when done; the Hybrid's
// Close closes it. A closed Hybrid returns ErrClosed.
func (h *Hybrid) Subscribe(queue int) (*prefix.Subscription, error) {
	if !h.made() {
		return nil, fmt.Errorf("kvcache: hybrid subscribe: %w", errHybridNotMade)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, m := range h.groups {
		if m.closed { // each group's Close closes the feed: a group not closed yet will
			return nil, fmt.Errorf("kvcache: hybrid subscribe: %w", ErrClosed)
		}
	}
	if err := checkQueue(queue); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid subscribe: %w", err)
	}
	h.groups[0].flushHeld() // as Manager.Subscribe: held events go to earlier subscribers
	sub, err := h.feed.Subscribe(queue)
	if err != nil {
		return nil, fmt.Errorf("kvcache: hybrid subscribe: %w", err)
	}
	return sub, nil
}

// shareFeed makes every group publish to the Hybrid's one feed, its events marked with the
// group, and makes a Read pull what every group holds back.
func (h *Hybrid) shareFeed() {
	h.feed = new(prefix.Feed)
	for i, m := range h.groups {
		g := h.geom.Groups[i]
		m.feed = h.feed
		m.group = eventGroup{set: true, idx: i, kind: specKind(g), all: h.groups}
		if g.Kind == SlidingWindow {
			m.group.window = g.Window
		}
	}
	h.feed.SetPull(func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, m := range h.groups {
			m.flushEvents()
		}
	})
}
