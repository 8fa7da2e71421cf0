// Package metrics exports pagedkv's figures to Prometheus: a Collector over managers, shared
// pools, hybrid caches and ledgers, registered like any other (prometheus.MustRegister, or a Registry of your
// own), with the usual names (pagedkv_mapped_bytes, pagedkv_prefix_hit_tokens_total, ...).
//
// It lives apart so that importing kvcache never pulls in the Prometheus client. A scrape reads
// each object's Stats (one short lock per manager); the collector borrows what it is given and
// never closes it: Remove an object before closing it.
package metrics

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/internal/names"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
)

// Collector is a prometheus.Collector of pagedkv objects, each under a name unique in the
// collector. A name is a label value: 1 to 63 bytes of valid UTF-8 with no control character,
// the rule of model names (a *kvcache.NameError otherwise). Safe for concurrent use.
type Collector struct {
	mu       sync.Mutex
	managers map[string]*kvcache.Manager
	pools    map[string]*kvcache.SharedPool
	hybrids  map[string]*kvcache.Hybrid
	ledgers  map[string]*ledger.Ledger
}

// NewCollector returns an empty collector.
func NewCollector() *Collector {
	return &Collector{managers: map[string]*kvcache.Manager{}, pools: map[string]*kvcache.SharedPool{},
		hybrids: map[string]*kvcache.Hybrid{}, ledgers: map[string]*ledger.Ledger{}}
}

// add puts an object under name, a label value (model, pool or ledger, as what says), after
// checking the collector, the name and the object.
func (c *Collector) add(what, name string, nilObj bool, put func()) error {
	if c == nil || c.managers == nil {
		return fmt.Errorf("metrics: add %s: %w: nil collector, or one not made by NewCollector", what, errdefs.ErrInvalidArgument)
	}
	if err := names.Check(what, name); err != nil {
		return fmt.Errorf("metrics: add: %w", err)
	}
	if nilObj {
		return fmt.Errorf("metrics: add %s %q: %w: nil object", what, name, errdefs.ErrInvalidArgument)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.has(name) {
		return fmt.Errorf("metrics: add %s %q: %w", what, name, errdefs.ErrExists)
	}
	put()
	return nil
}

// has reports whether an object is added under name (c.mu is held).
func (c *Collector) has(name string) bool {
	_, m := c.managers[name]
	_, p := c.pools[name]
	_, h := c.hybrids[name]
	_, l := c.ledgers[name]
	return m || p || h || l
}

// AddManager exports a manager's Stats under model=name.
func (c *Collector) AddManager(name string, m *kvcache.Manager) error {
	return c.add("model", name, m == nil, func() { c.managers[name] = m })
}

// AddSharedPool exports a shared pool's limit and use under pool=name, and each of its models'
// Stats under model=<the model's name>, pool=name.
func (c *Collector) AddSharedPool(name string, p *kvcache.SharedPool) error {
	return c.add("pool", name, p == nil, func() { c.pools[name] = p })
}

// AddHybrid exports each layer group of a hybrid cache as a model of a pool named name:
// model=<the group's Name, or group-<index> when it has none, or one that is not a valid label
// or not unique among the groups>, pool=name (a Hybrid's groups share one budget, as a pool's
// models do).
func (c *Collector) AddHybrid(name string, h *kvcache.Hybrid) error {
	return c.add("hybrid", name, h == nil, func() { c.hybrids[name] = h })
}

// AddLedger exports a ledger's limit and each member's mapped bytes (all processes) under
// ledger=name; a member whose name in the file is not a valid label is left out.
func (c *Collector) AddLedger(name string, l *ledger.Ledger) error {
	return c.add("ledger", name, l == nil, func() { c.ledgers[name] = l })
}

// Remove forgets the object added under name (ErrNotFound if none).
func (c *Collector) Remove(name string) error {
	if c == nil || c.managers == nil {
		return fmt.Errorf("metrics: remove %q: %w: nil collector", name, errdefs.ErrInvalidArgument)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.has(name) {
		return fmt.Errorf("metrics: remove %q: %w", name, errdefs.ErrNotFound)
	}
	delete(c.managers, name)
	delete(c.pools, name)
	delete(c.hybrids, name)
	delete(c.ledgers, name)
	return nil
}

type desc struct {
	d     *prometheus.Desc
	typ   prometheus.ValueType
	value func(s *kvcache.Stats) float64
	extra []string // constant label values after model and pool
}

var modelLabels = []string{"model", "pool"}

func gauge(name, help string, f func(s *kvcache.Stats) float64) desc {
	return desc{prometheus.NewDesc(name, help, modelLabels, nil), prometheus.GaugeValue, f, nil}
}

func counter(name, help string, f func(s *kvcache.Stats) float64) desc {
	return desc{prometheus.NewDesc(name, help, modelLabels, nil), prometheus.CounterValue, f, nil}
}

// labelled shares one Desc among several series told apart by one more label.
func labelled(typ prometheus.ValueType, name, help, label string, values map[string]func(s *kvcache.Stats) float64) []desc {
	return labelledOn(prometheus.NewDesc(name, help, append(slices.Clone(modelLabels), label), nil), typ, values)
}

// labelledOn is labelled with the Desc d, whose labels are modelLabels and one more.
func labelledOn(d *prometheus.Desc, typ prometheus.ValueType, values map[string]func(s *kvcache.Stats) float64) []desc {
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]desc, 0, len(keys))
	for _, k := range keys {
		out = append(out, desc{d, typ, values[k], []string{k}})
	}
	return out
}

// managerDescs are the series of one manager, read from its Stats.
var managerDescs = slices.Concat(
	[]desc{
		gauge("pagedkv_mapped_bytes", "Physical memory the manager's arena has mapped.", func(s *kvcache.Stats) float64 { return float64(s.MappedBytes) }),
		gauge("pagedkv_scratch_bytes", "Device memory held beside the arena (the copy kernel's staging buffer).", func(s *kvcache.Stats) float64 { return float64(s.ScratchBytes) }),
		gauge("pagedkv_sequences", "Sequences the manager holds.", func(s *kvcache.Stats) float64 { return float64(s.Sequences) }),
		gauge("pagedkv_live_blocks", "Distinct blocks sequences hold.", func(s *kvcache.Stats) float64 { return float64(s.LiveBlocks) }),
		gauge("pagedkv_page_overhead_ratio", "Mapped pages over the pages live and idle cached blocks need (1 is none wasted).", func(s *kvcache.Stats) float64 { return s.PageOverhead }),
		counter("pagedkv_page_unmaps_total", "Pages returned to the device.", func(s *kvcache.Stats) float64 { return float64(s.Unmaps) }),
		counter("pagedkv_copy_on_writes_total", "Shared tail blocks copied on append.", func(s *kvcache.Stats) float64 { return float64(s.CopyOnWrites) }),
		counter("pagedkv_compactions_total", "Compactions that moved blocks.", func(s *kvcache.Stats) float64 { return float64(s.Compactions) }),
		counter("pagedkv_blocks_moved_total", "Blocks moved by compactions.", func(s *kvcache.Stats) float64 { return float64(s.BlocksMoved) }),
		counter("pagedkv_prefix_query_tokens_total", "Prompt tokens looked up in the prefix cache.", func(s *kvcache.Stats) float64 { return float64(s.Prefix.QueryTokens) }),
		counter("pagedkv_prefix_evictions_total", "Cached blocks evicted from device memory.", func(s *kvcache.Stats) float64 { return float64(s.Prefix.Evictions) }),
		gauge("pagedkv_swapped_sequences", "Sequences swapped out to the host tier.", func(s *kvcache.Stats) float64 { return float64(s.SwappedSequences) }),
	},
	labelled(prometheus.GaugeValue, "pagedkv_pages", "Mapped pages by how many of their blocks are in use.", "state", map[string]func(s *kvcache.Stats) float64{
		"free": func(s *kvcache.Stats) float64 { return float64(s.FreePages) }, "partial": func(s *kvcache.Stats) float64 { return float64(s.PartialPages) },
		"full": func(s *kvcache.Stats) float64 { return float64(s.FullPages) },
	}),
	labelled(prometheus.CounterValue, "pagedkv_page_maps_total", "Pages mapped: by an append itself (sync) or ahead of need (background).", "path", map[string]func(s *kvcache.Stats) float64{
		"sync": func(s *kvcache.Stats) float64 { return float64(s.SyncMaps) }, "background": func(s *kvcache.Stats) float64 { return float64(s.BackgroundMaps) },
	}),
	labelledOn(hitTokensDesc, prometheus.CounterValue, map[string]func(s *kvcache.Stats) float64{
		"gpu": func(s *kvcache.Stats) float64 {
			return float64(s.Prefix.HitTokens - min(s.Prefix.HitTokens, s.Prefix.HostHitTokens+s.Prefix.UnheldHitTokens))
		},
		"host": func(s *kvcache.Stats) float64 {
			return float64(s.Prefix.HostHitTokens - min(s.Prefix.HostHitTokens, tierHits(s)))
		},
	}),
	labelled(prometheus.GaugeValue, "pagedkv_prefix_cached_blocks", "Blocks in the prefix cache, by tier.", "tier", map[string]func(s *kvcache.Stats) float64{
		"gpu": func(s *kvcache.Stats) float64 { return float64(s.Prefix.CachedBlocks) }, "host": func(s *kvcache.Stats) float64 { return float64(s.Prefix.HostCachedBlocks) },
	}),
	labelled(prometheus.CounterValue, "pagedkv_swap_blocks_total", "Blocks swapped to and from the host tier.", "direction", map[string]func(s *kvcache.Stats) float64{
		"out": func(s *kvcache.Stats) float64 { return float64(s.SwapOuts) }, "in": func(s *kvcache.Stats) float64 { return float64(s.SwapIns) },
	}),
	labelled(prometheus.CounterValue, "pagedkv_warnings_total", "Calls served that a runtime rarely means (kvcache.Warnings): appends that created a sequence, count-only appends to keyed sequences, prompts appended whole after a hit.", "kind", map[string]func(s *kvcache.Stats) float64{
		"implicit_sequence": func(s *kvcache.Stats) float64 { return float64(s.Warnings.ImplicitSequences) },
		"unkeyed_append":    func(s *kvcache.Stats) float64 { return float64(s.Warnings.UnkeyedAppends) },
		"repeated_prompt":   func(s *kvcache.Stats) float64 { return float64(s.Warnings.RepeatedPrompts) },
	}),
	labelled(prometheus.CounterValue, "pagedkv_checkpoints_total", "A recurrent-state group's checkpoints (kvcache.CheckpointStats): made by MarkWritten, skipped for want of memory, and starts resumed from one.", "outcome", map[string]func(s *kvcache.Stats) float64{
		"made": func(s *kvcache.Stats) float64 { return float64(s.Prefix.Checkpoints.Made) }, "skipped": func(s *kvcache.Stats) float64 { return float64(s.Prefix.Checkpoints.Skipped) },
		"resumed": func(s *kvcache.Stats) float64 { return float64(s.Prefix.Checkpoints.Resumed) },
	}),
	labelled(prometheus.GaugeValue, "pagedkv_host_blocks", "Blocks of the host tier: all, and the free, swapped-out and cached ones, which add up to all.", "state", map[string]func(s *kvcache.Stats) float64{
		"total": func(s *kvcache.Stats) float64 { return float64(s.HostBlocks) }, "free": func(s *kvcache.Stats) float64 { return float64(s.HostFreeBlocks) },
		"swapped": func(s *kvcache.Stats) float64 { return float64(s.HostSwappedBlocks) }, "cached": func(s *kvcache.Stats) float64 { return float64(s.Prefix.HostCachedBlocks) },
	}),
)

// tierHits returns the prompt tokens the manager's tiers below the host found: they reach the
// device through the host, so HostHitTokens counts them too.
func tierHits(s *kvcache.Stats) uint64 {
	var n uint64
	for _, t := range s.Prefix.Tiers {
		n += t.HitTokens
	}
	return n
}

// The series of the stores below the host tier (kvcache.Config.Tiers), one per tier, labelled
// by its medium in lower case; hits share pagedkv_prefix_hit_tokens_total with the GPU and host.
var (
	tierLabels    = []string{"model", "pool", "tier"}
	hitTokensDesc = prometheus.NewDesc("pagedkv_prefix_hit_tokens_total", "Prompt tokens found in the prefix cache, by the tier they came from.", tierLabels, nil)
	tierDescs     = []struct {
		d     *prometheus.Desc
		value func(t *kvcache.TierStats) float64
	}{
		{prometheus.NewDesc("pagedkv_tier_stored_blocks_total", "Blocks written to a store below the host tier.", tierLabels, nil), func(t *kvcache.TierStats) float64 { return float64(t.Stored) }},
		{prometheus.NewDesc("pagedkv_tier_failures_total", "Calls to a store below the host tier that failed or timed out (each a miss).", tierLabels, nil), func(t *kvcache.TierStats) float64 { return float64(t.Failures) }},
		{prometheus.NewDesc("pagedkv_tier_evicted_blocks_total", "Blocks a store below the host tier reported evicting on its own, each sent as a BlockRemoved event.", tierLabels, nil), func(t *kvcache.TierStats) float64 { return float64(t.Evicted) }},
		{prometheus.NewDesc("pagedkv_tier_evictions_lost_total", "Evictions a store below the host tier could not name (its report overflowed): each loss sent AllBlocksCleared for the tier.", tierLabels, nil), func(t *kvcache.TierStats) float64 { return float64(t.EvictionsLost) }},
		{prometheus.NewDesc("pagedkv_tier_corrupt_blocks_total", "Blocks a store below the host tier dropped because a check failed (checksum, header, another model).", tierLabels, nil), func(t *kvcache.TierStats) float64 { return float64(t.Store.Corrupt) }},
	}
)

var (
	poolLimit     = prometheus.NewDesc("pagedkv_limit_bytes", "The physical limit a shared pool's models share (per device).", []string{"pool"}, nil)
	poolUsed      = prometheus.NewDesc("pagedkv_used_bytes", "Bytes a shared pool's models hold (the most on any device).", []string{"pool"}, nil)
	ledgerLimit   = prometheus.NewDesc("pagedkv_ledger_limit_bytes", "The limit the processes of a ledger share.", []string{"ledger"}, nil)
	ledgerUsed    = prometheus.NewDesc("pagedkv_ledger_used_bytes", "Bytes all members of a ledger hold, over all processes.", []string{"ledger"}, nil)
	ledgerMembers = prometheus.NewDesc("pagedkv_ledger_member_mapped_bytes", "Bytes one member of a ledger holds.", []string{"ledger", "member", "pid"}, nil)
)

// groupLabel returns the model label of a Hybrid's group i: its Name, or group-<i> when that
// is not a valid label, is another group's Name too, or is another group's group-<j>. Geometry
// leaves names free, and two groups under one label would fail the whole scrape as duplicates.
func groupLabel(groups []kvcache.LayerGroup, i int) string {
	own := "group-" + strconv.Itoa(i)
	if i >= len(groups) || names.Check("model", groups[i].Name) != nil {
		return own
	}
	name := groups[i].Name
	for j := range groups {
		if j != i && (groups[j].Name == name || "group-"+strconv.Itoa(j) == name) {
			return own
		}
	}
	return name
}

// Describe sends every series' description (nothing to a nil channel).
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	if ch == nil {
		return
	}
	seen := map[*prometheus.Desc]bool{}
	for _, d := range managerDescs {
		if !seen[d.d] {
			seen[d.d] = true
			ch <- d.d
		}
	}
	for _, d := range tierDescs {
		ch <- d.d
	}
	for _, d := range []*prometheus.Desc{poolLimit, poolUsed, ledgerLimit, ledgerUsed, ledgerMembers} {
		ch <- d
	}
}

// Collect reads every object's figures (nothing for a nil collector or channel; a closed
// ledger is skipped, a closed manager reports what it held last).
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c == nil || c.managers == nil || ch == nil {
		return
	}
	c.mu.Lock()
	managers, pools, hybrids, ledgers := maps.Clone(c.managers), maps.Clone(c.pools), maps.Clone(c.hybrids), maps.Clone(c.ledgers)
	c.mu.Unlock()
	emit := func(model, pool string, s *kvcache.Stats) {
		for _, d := range managerDescs {
			ch <- prometheus.MustNewConstMetric(d.d, d.typ, d.value(s), append([]string{model, pool}, d.extra...)...)
		}
		for i := range s.Prefix.Tiers {
			t := &s.Prefix.Tiers[i]
			name := strings.ToLower(t.Medium)
			ch <- prometheus.MustNewConstMetric(hitTokensDesc, prometheus.CounterValue, float64(t.HitTokens), model, pool, name)
			for _, d := range tierDescs {
				ch <- prometheus.MustNewConstMetric(d.d, prometheus.CounterValue, d.value(t), model, pool, name)
			}
		}
	}
	for name, m := range managers {
		s := m.Stats()
		emit(name, "", &s)
	}
	for name, p := range pools {
		st := p.Stats()
		ch <- prometheus.MustNewConstMetric(poolLimit, prometheus.GaugeValue, float64(st.Limit), name)
		ch <- prometheus.MustNewConstMetric(poolUsed, prometheus.GaugeValue, float64(st.Used), name)
		for i := range st.Models {
			emit(st.Models[i].Name, name, &st.Models[i].Stats)
		}
	}
	for name, h := range hybrids {
		st := h.Stats() // a closed Hybrid reports nothing
		groups := h.Geometry().Groups
		for i := range st.Groups {
			emit(groupLabel(groups, i), name, &st.Groups[i])
		}
	}
	for name, l := range ledgers {
		s, err := l.Snapshot()
		if err != nil {
			continue // closed: nothing to report
		}
		ch <- prometheus.MustNewConstMetric(ledgerLimit, prometheus.GaugeValue, float64(s.Limit), name)
		ch <- prometheus.MustNewConstMetric(ledgerUsed, prometheus.GaugeValue, float64(s.Used), name)
		for _, m := range s.Members {
			// The names come from a file other processes write: one that is not a valid label
			// (a corrupted slot) would panic the scrape. Its bytes stay in the ledger's used bytes.
			if names.Check("member", m.Name) != nil {
				continue
			}
			ch <- prometheus.MustNewConstMetric(ledgerMembers, prometheus.GaugeValue, float64(m.Mapped), name, m.Name, strconv.Itoa(m.PID))
		}
	}
}
