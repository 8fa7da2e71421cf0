package kvcache

import (
	"fmt"
	"sync"

	"github.com/pagedkv/pagedkv/vmm"
)

// NewHybridMulti makes a Hybrid on several devices, each layer group divided among them by
// split as NewMulti divides a model (see Split): device d is pipeline stage d/TensorParallel
// and tensor rank d%TensorParallel. The groups share one SharedPool over devs (NewSharedMulti),
// so cfg.Limit is each device's budget for all groups together (0: the smallest device's
// memory), and cfg.Capacity is each group's reservation over all devices. The Hybrid borrows
// the devices, which must be distinct, and owns everything it maps on them.
//
// Tensor parallel: each rank holds KVHeads/TensorParallel of a group's KV heads. A group with
// fewer heads than ranks (an MLA latent, a GQA group of few heads) is copied as vLLM does: each
// rank holds one head, rank r head r*KVHeads/TensorParallel, so KVHeads must divide
// TensorParallel. A recurrent group's state is divided among the ranks, rank r holding bytes
// [r*StateBytes/TensorParallel, (r+1)*StateBytes/TensorParallel) of every layer's state, as
// vLLM divides the heads of Gated DeltaNet and Mamba layers. StateBytes must then be a
// multiple of 16*TensorParallel.
//
// Pipeline parallel: the model's layers form PipelineParallel contiguous stages of
// Geometry.Layers/PipelineParallel layers, and stage s holds each group's s-th equal share of
// its layers (in LayerGroup.Layers' order). That is right only where every group's layers in
// stage s are exactly that share; any other geometry is refused.
//
// Group(i).Shards() gives each device's share of group i, in device order. A shard's Layers
// range indexes the group's own layer list (LayerGroup.Layers), not the model's layer numbers:
// model layer Layers[j] is the group's layer j, on the shard whose range holds j. Its KVHeads
// range is of the group's heads; ranks holding a copy of one head both name it. Everything else
// works as with NewHybrid, on every device at once (appends, starts, marks, forks, truncations,
// compaction, events, Verify, Close): what a group does is all or nothing across its devices.
//
// A split that does not fit the geometry is a *GroupError naming the group and its numbers
// (KV heads, state bytes, layers); a wrong device count, a nil or repeated device, or a model
// whose layers do not divide among the stages is a *ConfigError.
func NewHybridMulti(devs []vmm.Device, cfg HybridConfig, split Split) (*Hybrid, error) {
	if err := checkDevices(devs, split); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	g := cfg.Geometry
	if err := g.Validate(); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	if err := checkSplit(g, split); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	if err := checkHost(cfg); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	if len(devs) == 1 {
		return NewHybrid(devs[0], cfg)
	}
	if cfg.Tiers != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", &ConfigError{Field: "Tiers", Value: len(devs), Reason: "a Hybrid on one device only"})
	}
	limit := cfg.Limit
	if limit == 0 {
		limit = devs[0].Info().TotalMemory
		for _, d := range devs[1:] {
			limit = min(limit, d.Info().TotalMemory)
		}
	}
	pool, err := NewSharedMulti(devs, SharedConfig{Limit: limit, CompactOnPressure: cfg.CompactOnPressure, Split: split, Ledger: cfg.Ledger}) // a ledger is refused: one GPU's
	if err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	gran := devs[0].Info().Granularity
	h, err := newHybridOn(pool, g, func(i int, grp LayerGroup, mu *sync.Mutex) (*Manager, error) {
		whole, err := groupConfig(grp, cfg, gran)
		if err != nil {
			return nil, err
		}
		whole.PageSize, whole.BlockPadding = 0, 0 // each device's share gets its own (groupPage)
		return pool.registerSplit(groupName(cfg.Name, i), whole, mu, groupPage)
	})
	if err != nil {
		return nil, err
	}
	return h.keepScales() // every layer's scales on every device: they are per layer, not per head
}

// checkDevices checks that devs are split's count of distinct devices.
func checkDevices(devs []vmm.Device, split Split) error {
	tp, pp := split.TensorParallel, split.PipelineParallel
	if tp < 0 || pp < 0 {
		return &ConfigError{Field: "Split", Value: split, Reason: "tensor and pipeline parallel sizes must not be negative"}
	}
	tp, pp = max(tp, 1), max(pp, 1)
	if tp > len(devs) || pp > len(devs) || tp*pp != len(devs) {
		return &ConfigError{Field: "devices", Value: len(devs), Reason: fmt.Sprintf("a split of %d x %d needs as many devices as ranks times stages", tp, pp)}
	}
	seen := make(map[vmm.Device]int, len(devs))
	for i, d := range devs {
		if d == nil {
			return &ConfigError{Field: "devices", Value: i, Reason: fmt.Sprintf("device %d is nil", i)}
		}
		if j, ok := seen[d]; ok {
			return &ConfigError{Field: "devices", Value: i, Reason: fmt.Sprintf("device %d is device %d again", i, j)}
		}
		seen[d] = i
	}
	return nil
}

// checkSplit checks that split divides every group of g (a valid geometry): its heads or state
// among the ranks, and its layers among the stages so that stage s holds exactly the group's
// s-th equal share (what each device's arena holds).
func checkSplit(g Geometry, split Split) error {
	tp, pp := max(split.TensorParallel, 1), max(split.PipelineParallel, 1)
	if g.Layers%pp != 0 {
		return &ConfigError{Field: "Geometry.Layers", Value: g.Layers, Reason: fmt.Sprintf("must divide evenly among %d pipeline stages", pp)}
	}
	stage := g.Layers / pp
	for i, grp := range g.Groups {
		bad := func(field string, v any, reason string, args ...any) error {
			return &GroupError{Group: i, Name: grp.Name, Field: field, Value: v, Reason: fmt.Sprintf(reason, args...)}
		}
		switch {
		case grp.Kind == RecurrentState && grp.StateBytes%(16*uint64(tp)) != 0:
			return bad("StateBytes", grp.StateBytes, "a state divided among %d tensor-parallel ranks must be a multiple of %d bytes", tp, 16*tp)
		case grp.Kind != RecurrentState && grp.KVHeads%tp != 0 && tp%grp.KVHeads != 0:
			return bad("KVHeads", grp.KVHeads, "must divide evenly among %d tensor-parallel ranks, or divide %d (each rank then holds a copy of one head)", tp, tp)
		case len(grp.Layers)%pp != 0:
			return bad("Layers", len(grp.Layers), "the group's layers must divide evenly among %d pipeline stages", pp)
		}
		share := len(grp.Layers) / pp
		for j, l := range grp.Layers {
			if l/stage != j/share {
				return bad("Layers", l, "model layer %d is in pipeline stage %d (%d layers a stage), but it is the group's layer %d, which stage %d holds (%d of the group's %d layers a stage)",
					l, l/stage, stage, j, j/share, share, len(grp.Layers))
			}
		}
	}
	return nil
}
