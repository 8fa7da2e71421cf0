package kvcache_test

import (
	"fmt"
	"math"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
)

// The presets validate and say what the models' published configs say.
func TestGeometryPresets(t *testing.T) {
	type want struct {
		layers int
		groups map[string]int // name -> layers
		kinds  map[string]kvcache.AttentionKind
	}
	cases := map[string]want{
		"gpt-oss-120b":       {36, map[string]int{"sliding": 18, "full": 18}, map[string]kvcache.AttentionKind{"sliding": kvcache.SlidingWindow}},
		"gpt-oss-20b":        {24, map[string]int{"sliding": 12, "full": 12}, nil},
		"gemma-3-27b":        {62, map[string]int{"local": 52, "global": 10}, map[string]kvcache.AttentionKind{"local": kvcache.SlidingWindow}},
		"llama-4-scout":      {48, map[string]int{"chunked": 36, "global": 12}, map[string]kvcache.AttentionKind{"chunked": kvcache.ChunkedAttention}},
		"deepseek-v3":        {61, map[string]int{"mla": 61}, nil},
		"qwen3-next-80b-a3b": {48, map[string]int{"full": 12, "deltanet": 36}, map[string]kvcache.AttentionKind{"deltanet": kvcache.RecurrentState}},
	}
	for name, w := range cases {
		g, err := kvcache.GeometryFor(name)
		require.NoError(t, err, name)
		require.NoError(t, g.Validate(), name)
		require.Equal(t, w.layers, g.Layers, name)
		got := map[string]int{}
		for _, grp := range g.Groups {
			got[grp.Name] = len(grp.Layers)
			if k, ok := w.kinds[grp.Name]; ok {
				require.Equal(t, k, grp.Kind, "%s %s", name, grp.Name)
			}
		}
		require.Equal(t, w.groups, got, name)
	}
	g, _ := kvcache.GeometryFor("gemma-3-27b")
	require.Equal(t, []int{5, 11, 17, 23, 29, 35, 41, 47, 53, 59}, g.Groups[1].Layers, "every sixth layer global")
	require.Equal(t, 1024, g.Groups[0].Window)
	q, _ := kvcache.GeometryFor("qwen3-next-80b-a3b")
	state := float64(q.Groups[1].StateBytes) * float64(len(q.Groups[1].Layers)) / (1 << 20)
	require.InDelta(t, 37.7, state, 0.05, "MiB of recurrent state a sequence")
	d, _ := kvcache.GeometryFor("deepseek-v3")
	require.EqualValues(t, 1152, d.Groups[0].TokenBytes(), "576 bf16 elements, K only")
	require.Equal(t, 64, d.Groups[0].BlockTokens)
	s, _ := kvcache.GeometryFor("Llama-4-Scout")
	require.Equal(t, 3, s.Groups[1].Layers[0], "names are case-insensitive; (i+1)%4 == 0 is global")

	_, err := kvcache.GeometryFor("gpt-5")
	require.ErrorIs(t, err, kvcache.ErrNotFound)
	require.Contains(t, err.Error(), "gemma-3-27b", "the error lists the known models")
	require.Len(t, kvcache.Models(), 8)
}

// Each bad setting is a *GroupError (or a *ConfigError for the model) naming the group and the
// numbers.
func TestGeometryBadInput(t *testing.T) {
	base := func() kvcache.Geometry { g, _ := kvcache.GeometryFor("gpt-oss-20b"); return g }
	fp8 := func() kvcache.Geometry {
		g := base()
		g.Groups[1].DType = kvcache.FP8E4M3
		g.Groups[1].KScales = make([]float32, 12)
		g.Groups[1].VScales = make([]float32, 12)
		for i := range 12 {
			g.Groups[1].KScales[i], g.Groups[1].VScales[i] = 0.5, 0.25
		}
		return g
	}
	require.NoError(t, fp8().Validate(), "fp8 with a scale for every layer")
	cases := []struct {
		name   string
		mutate func(g *kvcache.Geometry)
		group  int    // -1: a *ConfigError
		field  string // of the error
	}{
		{"overlapping layers", func(g *kvcache.Geometry) { g.Groups[1].Layers[0] = 0 }, 1, "Layers"},
		{"missing layer", func(g *kvcache.Geometry) { g.Groups[1].Layers = g.Groups[1].Layers[1:] }, -1, "Geometry.Groups"},
		{"layer outside the model", func(g *kvcache.Geometry) { g.Groups[1].Layers[0] = 24 }, 1, "Layers"},
		{"negative layer", func(g *kvcache.Geometry) { g.Groups[0].Layers[0] = -1 }, 0, "Layers"},
		{"empty group", func(g *kvcache.Geometry) { g.Groups[0].Layers = nil }, 0, "Layers"},
		{"no groups", func(g *kvcache.Geometry) { g.Groups = nil }, -1, "Geometry.Groups"},
		{"no layers", func(g *kvcache.Geometry) { g.Layers = 0 }, -1, "Geometry.Layers"},
		{"window of 0", func(g *kvcache.Geometry) { g.Groups[0].Window = 0 }, 0, "Window"},
		{"window past any sequence", func(g *kvcache.Geometry) { g.Groups[0].Window = math.MaxInt32 + 1 }, 0, "Window"},
		{"window on full attention", func(g *kvcache.Geometry) { g.Groups[1].Window = 4 }, 1, "Window"},
		{"sinks on chunked", func(g *kvcache.Geometry) { g.Groups[0].Kind, g.Groups[0].Sinks = kvcache.ChunkedAttention, 4 }, 0, "Sinks"},
		{"negative sinks", func(g *kvcache.Geometry) { g.Groups[0].Sinks = -1 }, 0, "Sinks"},
		{"sinks past any sequence", func(g *kvcache.Geometry) { g.Groups[0].Sinks = math.MaxInt }, 0, "Sinks"},
		{"MLA with V dims", func(g *kvcache.Geometry) {
			g.Groups[1].KVHeads, g.Groups[1].KHeadDim, g.Groups[1].RopeDim = 1, 576, 64
		}, 1, "RopeDim"},
		{"rope past the latent", func(g *kvcache.Geometry) {
			g.Groups[1].KVHeads, g.Groups[1].KHeadDim, g.Groups[1].VHeadDim, g.Groups[1].RopeDim = 1, 64, 0, 64
		}, 1, "RopeDim"},
		{"fp8 without scales", func(g *kvcache.Geometry) { *g = fp8(); g.Groups[1].KScales = nil }, 1, "KScales/VScales"},
		{"fp8 with a zero scale", func(g *kvcache.Geometry) { *g = fp8(); g.Groups[1].VScales[3] = 0 }, 1, "KScales/VScales"},
		{"fp8 with a NaN scale", func(g *kvcache.Geometry) { *g = fp8(); g.Groups[1].KScales[0] = float32(math.NaN()) }, 1, "KScales/VScales"},
		{"scales on bf16", func(g *kvcache.Geometry) { g.Groups[1].KScales = []float32{1} }, 1, "KScales/VScales"},
		{"row not 16-byte words", func(g *kvcache.Geometry) { g.Groups[1].KHeadDim = 60 }, 1, "KHeadDim/VHeadDim"},
		{"fp8 head of 8", func(g *kvcache.Geometry) { *g = fp8(); g.Groups[1].KHeadDim, g.Groups[1].VHeadDim = 8, 8 }, 1, "KHeadDim/VHeadDim"},
		{"block of 0 tokens", func(g *kvcache.Geometry) { g.Groups[0].BlockTokens = 0 }, 0, "BlockTokens"},
		{"block too large to index", func(g *kvcache.Geometry) { g.Groups[0].BlockTokens = 1 << 17 }, 0, "BlockTokens"},
		{"unknown dtype", func(g *kvcache.Geometry) { g.Groups[0].DType = 9 }, 0, "DType"},
		{"unknown kind", func(g *kvcache.Geometry) { g.Groups[0].Kind = 9 }, 0, "Kind"},
		{"state on attention", func(g *kvcache.Geometry) { g.Groups[0].StateBytes = 16 }, 0, "StateBytes"},
		{"recurrent without state", func(g *kvcache.Geometry) {
			g.Groups[0] = kvcache.LayerGroup{Name: "ssm", Layers: g.Groups[0].Layers, Kind: kvcache.RecurrentState}
		}, 0, "StateBytes"},
		{"recurrent with heads", func(g *kvcache.Geometry) {
			g.Groups[0] = kvcache.LayerGroup{Name: "ssm", Layers: g.Groups[0].Layers, Kind: kvcache.RecurrentState, StateBytes: 1024, KVHeads: 8}
		}, 0, "Window/KVHeads/KHeadDim/VHeadDim"},
		{"fp8 recurrent state", func(g *kvcache.Geometry) {
			g.Groups[0] = kvcache.LayerGroup{Name: "ssm", Layers: g.Groups[0].Layers, Kind: kvcache.RecurrentState, StateBytes: 1024, DType: kvcache.FP8E5M2}
		}, 0, "DType/KScales/VScales"},
		{"scales on a recurrent state", func(g *kvcache.Geometry) {
			g.Groups[0] = kvcache.LayerGroup{Name: "ssm", Layers: g.Groups[0].Layers, Kind: kvcache.RecurrentState, StateBytes: 1024,
				DType: kvcache.FP8E4M3, KScales: []float32{float32(math.NaN())}}
		}, 0, "DType/KScales/VScales"},
	}
	for _, c := range cases {
		g := base()
		c.mutate(&g)
		err := g.Validate()
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument, c.name)
		if c.group < 0 {
			var ce *kvcache.ConfigError
			require.ErrorAs(t, err, &ce, c.name)
			require.Equal(t, c.field, ce.Field, c.name)
			continue
		}
		var ge *kvcache.GroupError
		require.ErrorAs(t, err, &ge, c.name)
		require.Equal(t, c.group, ge.Group, "%s: %v", c.name, err)
		require.Equal(t, c.field, ge.Field, "%s: %v", c.name, err)
		require.Contains(t, err.Error(), fmt.Sprintf("layer group %d (%q)", c.group, g.Groups[c.group].Name), c.name)
	}
}

// A layer count in range but far beyond the layers the groups list is refused at the first
// missing layer, with memory for the listed layers only: a map sized by the count took tens of
// GiB for math.MaxInt32 layers (2 GiB already for 2^26).
func TestGeometryHugeLayerCount(t *testing.T) {
	for _, layers := range []int{1 << 26, math.MaxInt32} {
		g := kvcache.Geometry{Model: "huge", Layers: layers, Groups: []kvcache.LayerGroup{
			{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16}}}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		err := g.Validate()
		runtime.ReadMemStats(&after)
		var ce *kvcache.ConfigError
		require.ErrorAs(t, err, &ce, "%d layers", layers)
		require.Equal(t, "Geometry.Groups", ce.Field)
		require.Contains(t, err.Error(), fmt.Sprintf("layer 1 of %d is in no group", layers))
		require.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(1<<20), "bytes allocated to validate %d layers", layers)
	}
}
