package kvcache

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"

	"github.com/pagedkv/pagedkv/internal/checked"
)

// AttentionKind says which earlier tokens a layer group's layers read, and so which of a
// sequence's blocks the group must keep.
type AttentionKind uint8

// The kinds of layer group.
const (
	// FullAttention layers read every earlier token: the group keeps every block.
	FullAttention AttentionKind = iota
	// SlidingWindow layers read the last Window tokens (and the first Sinks tokens, for models
	// with attention-sink tokens): blocks wholly before the window, past the sinks, are freed.
	SlidingWindow
	// ChunkedAttention layers read the tokens of the query's own chunk of Window tokens (Llama
	// 4's local layers): blocks of earlier chunks are freed.
	ChunkedAttention
	// RecurrentState layers keep no K/V but a fixed state per sequence (StateBytes a layer),
	// as Gated DeltaNet and Mamba layers do.
	RecurrentState
)

// String names the kind.
func (k AttentionKind) String() string {
	switch k {
	case FullAttention:
		return "full"
	case SlidingWindow:
		return "sliding window"
	case ChunkedAttention:
		return "chunked"
	case RecurrentState:
		return "recurrent state"
	}
	return fmt.Sprintf("AttentionKind(%d)", uint8(k))
}

// DType is the element type of a group's K/V.
type DType uint8

// The element types. FP8 types store x/scale, with a per-layer fp32 K and V scale.
const (
	F16 DType = iota
	BF16
	FP8E4M3
	FP8E5M2
)

// Size returns the bytes of one element (0 for an unknown type).
func (d DType) Size() int {
	switch d {
	case F16, BF16:
		return 2
	case FP8E4M3, FP8E5M2:
		return 1
	}
	return 0
}

// FP8 reports whether the type is an fp8 type (it needs scales).
func (d DType) FP8() bool { return d == FP8E4M3 || d == FP8E5M2 }

// String names the type as the model configs do.
func (d DType) String() string {
	switch d {
	case F16:
		return "float16"
	case BF16:
		return "bfloat16"
	case FP8E4M3:
		return "float8_e4m3fn"
	case FP8E5M2:
		return "float8_e5m2"
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// LayerGroup is a set of a model's layers that store the same thing per token and read the same
// earlier tokens, so they share one block table and one arena (block-major over their layers:
// one mapping grows all of them).
type LayerGroup struct {
	// Name says what the group is ("sliding", "global", "mla"); it names the group in errors.
	Name string
	// Layers are the model's layer indexes in the group, each in [0, Geometry.Layers).
	Layers []int
	Kind   AttentionKind
	// Window is the sliding window or the chunk, in tokens (SlidingWindow, ChunkedAttention).
	Window int
	// Sinks are leading tokens a sliding window always reads (attention sinks); 0 for none.
	Sinks int
	// KVHeads are the key/value heads of each layer; KHeadDim and VHeadDim their elements. A
	// VHeadDim of 0 stores K only (MLA: one latent of KHeadDim = 512 + 64 elements, no V).
	KVHeads, KHeadDim, VHeadDim int
	// RopeDim marks an MLA group (K only, one latent "head"): the latent's last RopeDim elements
	// are its rotary part, and attention outputs the first KHeadDim-RopeDim (DeepSeek: 512 + 64).
	RopeDim int
	DType   DType
	// BlockTokens are the tokens of one block (16 for FlashAttention and FlashInfer, 64 for
	// FlashMLA).
	BlockTokens int
	// StateBytes is one layer's recurrent state per sequence (RecurrentState).
	StateBytes uint64
	// Checkpoints are the tokens between a recurrent group's checkpoints: copies of a
	// sequence's state, kept in the group's arena so that a later prompt with the same prefix
	// resumes from one (vLLM's "align" mode). 0 keeps none, and then a Hybrid with the group
	// never finds a prefix hit. It must be a positive multiple of every attention group's
	// BlockTokens, at most MaxSequenceTokens, and set on a RecurrentState group only. The
	// runtime aligns its prefill chunks to it and calls Hybrid.MarkWritten at each multiple
	// (see Hybrid). A checkpoint costs a whole state (Layers x StateBytes).
	Checkpoints int
	// KScales and VScales are the fp32 scales of each of the group's layers (in Layers' order)
	// for an fp8 DType: a stored element is x/scale. They are required for fp8 (VScales empty
	// for K only) and refused otherwise. A Hybrid keeps them in device memory, where kernels
	// read them (Hybrid.Scales; kernels.KVWrite.KScaleAt).
	KScales, VScales []float32
}

// TokenBytes returns one token's bytes in one layer: K and V of every head (0 for a recurrent
// group).
func (g LayerGroup) TokenBytes() uint64 {
	return uint64(g.KVHeads) * uint64(g.KHeadDim+g.VHeadDim) * uint64(g.DType.Size())
}

// Geometry is a model's cache: its layers and the groups they fall in. Every layer belongs to
// exactly one group.
type Geometry struct {
	Model  string
	Layers int
	Groups []LayerGroup
}

// GroupError reports a layer group setting that cannot be used: Group names the group (its
// index and name), Field the setting, Value what it is and Reason what it must be. It matches
// ErrInvalidArgument.
type GroupError struct {
	Group  int
	Name   string
	Field  string
	Value  any
	Reason string
}

// Error describes the failure with its numbers.
func (e *GroupError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: layer group %d (%q): %s = %v: %s", e.Group, e.Name, e.Field, e.Value, e.Reason)
}

// Is reports whether target is ErrInvalidArgument.
func (e *GroupError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// maxGroupBlockTokens bounds a group's block: the kernels index a block's tokens with int32,
// and no attention kernel reads blocks of more than a few thousand tokens.
const maxGroupBlockTokens = 1 << 16

// Validate checks the geometry: every layer in exactly one group, and each group's settings
// usable by the kernels (a *GroupError naming the group and the numbers, or a *ConfigError for
// the model's layer count).
func (g Geometry) Validate() error {
	if g.Layers <= 0 || g.Layers > math.MaxInt32 {
		return &ConfigError{Field: "Geometry.Layers", Value: g.Layers, Reason: fmt.Sprintf("must lie in [1, %d]", math.MaxInt32)}
	}
	if len(g.Groups) == 0 {
		return &ConfigError{Field: "Geometry.Groups", Value: 0, Reason: "a geometry needs at least one layer group"}
	}
	listed := 0
	for _, grp := range g.Groups {
		listed += len(grp.Layers)
	}
	owner := make(map[int]int, min(listed, g.Layers)) // not g.Layers: a map for 2^31 layers is tens of GiB
	for i, grp := range g.Groups {
		bad := func(field string, v any, reason string, args ...any) error {
			return &GroupError{Group: i, Name: grp.Name, Field: field, Value: v, Reason: fmt.Sprintf(reason, args...)}
		}
		if len(grp.Layers) == 0 {
			return bad("Layers", "[]", "a group has at least one layer")
		}
		for _, l := range grp.Layers {
			if l < 0 || l >= g.Layers {
				return bad("Layers", l, "outside the model's %d layers", g.Layers)
			}
			if o, ok := owner[l]; ok {
				return bad("Layers", l, "layer %d is in group %d (%q) too", l, o, g.Groups[o].Name)
			}
			owner[l] = i
		}
		if err := grp.validate(bad); err != nil {
			return err
		}
		if err := g.validateCheckpoints(grp, bad); err != nil {
			return err
		}
	}
	if len(owner) != g.Layers {
		for l := range g.Layers {
			if _, ok := owner[l]; !ok {
				return &ConfigError{Field: "Geometry.Groups", Value: l, Reason: fmt.Sprintf("layer %d of %d is in no group", l, g.Layers)}
			}
		}
	}
	return nil
}

// validateCheckpoints checks grp's Checkpoints: a recurrent group's, in [0,
// MaxSequenceTokens], and a multiple of every attention group's block, so that a checkpoint
// lies on a block boundary of every group and a hit can end there.
func (g Geometry) validateCheckpoints(grp LayerGroup, bad func(field string, v any, reason string, args ...any) error) error {
	c := grp.Checkpoints
	switch {
	case c == 0:
		return nil
	case grp.Kind != RecurrentState:
		return bad("Checkpoints", c, "only a recurrent group keeps checkpoints (this one is %s)", grp.Kind)
	case c < 0 || c > MaxSequenceTokens:
		return bad("Checkpoints", c, "must lie in [0, %d]", MaxSequenceTokens)
	}
	for j, o := range g.Groups {
		if o.Kind != RecurrentState && o.BlockTokens > 0 && c%o.BlockTokens != 0 {
			return bad("Checkpoints", c, "must be a multiple of group %d (%q)'s BlockTokens %d", j, o.Name, o.BlockTokens)
		}
	}
	return nil
}

// validate checks one group's own settings; bad builds the error.
func (grp LayerGroup) validate(bad func(field string, v any, reason string, args ...any) error) error {
	if grp.Kind > RecurrentState {
		return bad("Kind", grp.Kind, "unknown kind")
	}
	if grp.Kind == RecurrentState {
		if grp.StateBytes == 0 || grp.StateBytes > MaxBlockStride || grp.StateBytes%16 != 0 {
			return bad("StateBytes", grp.StateBytes, "a recurrent state is a positive multiple of 16 bytes, at most %d", uint64(MaxBlockStride))
		}
		if grp.Window != 0 || grp.KVHeads != 0 || grp.KHeadDim != 0 || grp.VHeadDim != 0 {
			return bad("Window/KVHeads/KHeadDim/VHeadDim", fmt.Sprint(grp.Window, "/", grp.KVHeads, "/", grp.KHeadDim, "/", grp.VHeadDim), "a recurrent group has a state, no window and no K/V")
		}
		if grp.DType.FP8() || len(grp.KScales) > 0 || len(grp.VScales) > 0 {
			// The Hybrid would map scales for it, and Scales would name K/V it does not have.
			return bad("DType/KScales/VScales", fmt.Sprint(grp.DType, "/", len(grp.KScales), "/", len(grp.VScales)), "a recurrent state is no fp8 K/V and has no scales")
		}
		return nil
	}
	if grp.StateBytes != 0 {
		return bad("StateBytes", grp.StateBytes, "only a recurrent group has a state")
	}
	switch {
	case grp.Kind == FullAttention && (grp.Window != 0 || grp.Sinks != 0):
		return bad("Window", grp.Window, "full attention has no window or sinks")
	case grp.Kind != FullAttention && (grp.Window <= 0 || grp.Window > MaxSequenceTokens):
		return bad("Window", grp.Window, "a %s group needs a window in [1, %d]", grp.Kind, MaxSequenceTokens)
	case grp.Sinks < 0 || grp.Sinks > 0 && grp.Kind != SlidingWindow:
		return bad("Sinks", grp.Sinks, "sink tokens are a sliding window's, and not negative")
	case grp.Sinks > MaxSequenceTokens:
		return bad("Sinks", grp.Sinks, "must be at most %d", MaxSequenceTokens)
	}
	if grp.KVHeads <= 0 || grp.KVHeads > 1<<16 {
		return bad("KVHeads", grp.KVHeads, "must lie in [1, 65536]")
	}
	if grp.KHeadDim <= 0 || grp.KHeadDim > 1<<16 || grp.VHeadDim < 0 || grp.VHeadDim > 1<<16 {
		return bad("KHeadDim/VHeadDim", fmt.Sprint(grp.KHeadDim, "/", grp.VHeadDim), "K dims must lie in [1, 65536], V dims in [0, 65536] (0: K only)")
	}
	if grp.RopeDim != 0 && (grp.RopeDim < 0 || grp.RopeDim >= grp.KHeadDim || grp.VHeadDim != 0 || grp.KVHeads != 1) {
		return bad("RopeDim", grp.RopeDim, "an MLA group stores one latent of KHeadDim (%d) > RopeDim elements per token, with 1 KV head and no V (VHeadDim %d, KVHeads %d)",
			grp.KHeadDim, grp.VHeadDim, grp.KVHeads)
	}
	if grp.DType.Size() == 0 {
		return bad("DType", grp.DType, "unknown element type")
	}
	if kb, vb := grp.KHeadDim*grp.DType.Size(), grp.VHeadDim*grp.DType.Size(); kb%16 != 0 || vb%16 != 0 {
		return bad("KHeadDim/VHeadDim", fmt.Sprint(grp.KHeadDim, "/", grp.VHeadDim),
			"one head's K and V rows must be multiples of 16 bytes (the kernels move 16-byte words); in %s they are %d and %d bytes", grp.DType, kb, vb)
	}
	if err := grp.validateScales(bad); err != nil {
		return err
	}
	if grp.BlockTokens <= 0 || grp.BlockTokens > maxGroupBlockTokens {
		return bad("BlockTokens", grp.BlockTokens, "must lie in [1, %d]", maxGroupBlockTokens)
	}
	if _, ok := checked.MulN(MaxBlockStride, len(grp.Layers), grp.BlockTokens, int(grp.TokenBytes())); !ok {
		return bad("BlockTokens", grp.BlockTokens, "a block of all %d layers would pass %d bytes", len(grp.Layers), uint64(MaxBlockStride))
	}
	return nil
}

// validateScales checks the fp8 scales: one positive, finite scale per layer for K (and V when
// the group stores V), and none for other types.
func (grp LayerGroup) validateScales(bad func(field string, v any, reason string, args ...any) error) error {
	if !grp.DType.FP8() {
		if len(grp.KScales) > 0 || len(grp.VScales) > 0 {
			return bad("KScales/VScales", fmt.Sprint(len(grp.KScales), "/", len(grp.VScales)), "scales are for fp8 K/V, not %s", grp.DType)
		}
		return nil
	}
	wantV := len(grp.Layers)
	if grp.VHeadDim == 0 {
		wantV = 0
	}
	if len(grp.KScales) != len(grp.Layers) || len(grp.VScales) != wantV {
		return bad("KScales/VScales", fmt.Sprint(len(grp.KScales), "/", len(grp.VScales)),
			"%s needs a K scale for each of the %d layers and %d V scales", grp.DType, len(grp.Layers), wantV)
	}
	for _, sc := range slices.Concat(grp.KScales, grp.VScales) {
		if !(sc > 0) || math.IsInf(float64(sc), 0) {
			return bad("KScales/VScales", sc, "a scale is positive and finite")
		}
	}
	return nil
}

// presets are the geometries of models people serve, from their published configs.
var presets = map[string]func() Geometry{
	"gpt-oss-120b":       func() Geometry { return gptOSS("gpt-oss-120b", 36) },
	"gpt-oss-20b":        func() Geometry { return gptOSS("gpt-oss-20b", 24) },
	"gemma-3-27b":        gemma3,
	"llama-4-scout":      llama4Scout,
	"deepseek-v3":        func() Geometry { return deepSeek("deepseek-v3") },
	"deepseek-r1":        func() Geometry { return deepSeek("deepseek-r1") },
	"kimi-k2":            func() Geometry { return deepSeek("kimi-k2") },
	"qwen3-next-80b-a3b": qwen3Next,
}

// GeometryFor returns the cache geometry of a model people serve, by name (Models lists them):
// its layer groups as its published config gives them, bf16 K/V, 16-token blocks (64 for MLA, as
// FlashMLA reads). The result is the caller's to change (another block size, fp8 K/V).
func GeometryFor(model string) (Geometry, error) {
	f, ok := presets[strings.ToLower(model)]
	if !ok {
		return Geometry{}, fmt.Errorf("kvcache: geometry for %q: %w (known: %s)", model, ErrNotFound, strings.Join(Models(), ", "))
	}
	return f(), nil
}

// Models returns the names GeometryFor knows, sorted.
func Models() []string {
	names := make([]string, 0, len(presets))
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// layersWhere returns the layers of n for which keep holds.
func layersWhere(n int, keep func(int) bool) []int {
	var out []int
	for i := range n {
		if keep(i) {
			out = append(out, i)
		}
	}
	return out
}

// gptOSS: every even layer a 128-token sliding window, every odd one full attention; 8 KV heads
// of 64. (gpt-oss's attention sinks are learned per-head logits, not sink tokens: Sinks is 0.)
func gptOSS(name string, layers int) Geometry {
	even := func(i int) bool { return i%2 == 0 }
	return Geometry{Model: name, Layers: layers, Groups: []LayerGroup{
		{Name: "sliding", Layers: layersWhere(layers, even), Kind: SlidingWindow, Window: 128, KVHeads: 8, KHeadDim: 64, VHeadDim: 64, DType: BF16, BlockTokens: 16},
		{Name: "full", Layers: layersWhere(layers, func(i int) bool { return !even(i) }), Kind: FullAttention, KVHeads: 8, KHeadDim: 64, VHeadDim: 64, DType: BF16, BlockTokens: 16},
	}}
}

// gemma3 (27B): 62 layers, every sixth global, the rest a 1,024-token window; 16 KV heads of 128.
func gemma3() Geometry {
	global := func(i int) bool { return (i+1)%6 == 0 }
	return Geometry{Model: "gemma-3-27b", Layers: 62, Groups: []LayerGroup{
		{Name: "local", Layers: layersWhere(62, func(i int) bool { return !global(i) }), Kind: SlidingWindow, Window: 1024, KVHeads: 16, KHeadDim: 128, VHeadDim: 128, DType: BF16, BlockTokens: 16},
		{Name: "global", Layers: layersWhere(62, global), Kind: FullAttention, KVHeads: 16, KHeadDim: 128, VHeadDim: 128, DType: BF16, BlockTokens: 16},
	}}
}

// llama4Scout: 48 layers, chunked attention of 8,192 tokens unless (i+1)%4 == 0; 8 KV heads of 128.
func llama4Scout() Geometry {
	global := func(i int) bool { return (i+1)%4 == 0 }
	return Geometry{Model: "llama-4-scout", Layers: 48, Groups: []LayerGroup{
		{Name: "chunked", Layers: layersWhere(48, func(i int) bool { return !global(i) }), Kind: ChunkedAttention, Window: 8192, KVHeads: 8, KHeadDim: 128, VHeadDim: 128, DType: BF16, BlockTokens: 16},
		{Name: "global", Layers: layersWhere(48, global), Kind: FullAttention, KVHeads: 8, KHeadDim: 128, VHeadDim: 128, DType: BF16, BlockTokens: 16},
	}}
}

// deepSeek (V3, R1, Kimi K2): 61 layers of MLA, one latent of 512 + 64 rope elements per token
// and layer, K only, in the 64-token blocks FlashMLA reads.
func deepSeek(name string) Geometry {
	return Geometry{Model: name, Layers: 61, Groups: []LayerGroup{
		{Name: "mla", Layers: layersWhere(61, func(int) bool { return true }), Kind: FullAttention, KVHeads: 1, KHeadDim: 576, RopeDim: 64, DType: BF16, BlockTokens: 64},
	}}
}

// qwen3Next (80B-A3B): 48 layers, every fourth full attention (2 KV heads of 256), the other 36
// Gated DeltaNet layers with a state of 32 heads x 128 x 128 bf16 (1 MiB) plus a convolution
// state of 3 x (2 x 2,048 + 4,096) bf16 (48 KiB): 37.7 MiB a sequence over the 36 layers.
//
// Checkpoints stay 0. They work only when the runtime aligns its prefill chunks to them and
// marks each one, so the runtime opts in. And one costs 37.7 MiB, the K/V of about 1,600 tokens
// of the 12 attention layers (24 KiB a token): the interval trades memory for hit length, which
// only the workload decides. Every 1,024 or 2,048 tokens keeps the checkpoints near the size of
// the K/V they stand beside.
func qwen3Next() Geometry {
	full := func(i int) bool { return (i+1)%4 == 0 }
	return Geometry{Model: "qwen3-next-80b-a3b", Layers: 48, Groups: []LayerGroup{
		{Name: "full", Layers: layersWhere(48, full), Kind: FullAttention, KVHeads: 2, KHeadDim: 256, VHeadDim: 256, DType: BF16, BlockTokens: 16},
		{Name: "deltanet", Layers: layersWhere(48, func(i int) bool { return !full(i) }), Kind: RecurrentState, StateBytes: 32*128*128*2 + 3*(2*2048+4096)*2},
	}}
}

// Group returns the index of the group that holds layer l, and false when none does.
func (g Geometry) Group(layer int) (int, bool) {
	for i, grp := range g.Groups {
		if slices.Contains(grp.Layers, layer) {
			return i, true
		}
	}
	return 0, false
}
