package metrics_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/metrics"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
	"github.com/pagedkv/pagedkv/vmm"
)

func cfg() kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4, PageSize: 2 << 20, Capacity: 16 << 20, NoBackground: true}
}

func TestCollector(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer dev.Close()
	m, err := kvcache.New(dev, cfg())
	require.NoError(t, err)
	defer m.Close()
	_, err = m.AppendTokens(1, 1000, nil)
	require.NoError(t, err)
	l, err := ledger.Open(filepath.Join(t.TempDir(), "l"), ledger.Options{Limit: 8 << 20})
	require.NoError(t, err)
	defer l.Close()
	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
	require.NoError(t, err)
	defer pool.Close()
	pm, err := pool.Register("qwen", cfg())
	require.NoError(t, err)
	_, err = pm.AppendTokens(1, 10, nil)
	require.NoError(t, err)

	c := metrics.NewCollector()
	require.NoError(t, c.AddManager("llama", m))
	require.NoError(t, c.AddSharedPool("shared", pool))
	require.NoError(t, c.AddLedger("gpu0", l))
	require.ErrorIs(t, c.AddManager("llama", m), kvcache.ErrExists)
	require.ErrorIs(t, c.AddLedger("", l), kvcache.ErrInvalidArgument)
	require.ErrorIs(t, c.AddSharedPool("x", nil), kvcache.ErrInvalidArgument)
	require.ErrorIs(t, c.Remove("nobody"), kvcache.ErrNotFound)
	var nilC *metrics.Collector
	require.ErrorIs(t, nilC.AddManager("a", m), kvcache.ErrInvalidArgument)

	problems, err := testutil.CollectAndLint(c)
	require.NoError(t, err)
	require.Empty(t, problems, "names, units and help follow Prometheus' conventions")
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c), "descriptions match what is collected")
	_, err = reg.Gather()
	require.NoError(t, err)

	want := `
# HELP pagedkv_mapped_bytes Physical memory the manager's arena has mapped.
# TYPE pagedkv_mapped_bytes gauge
pagedkv_mapped_bytes{model="llama",pool=""} LLAMA
pagedkv_mapped_bytes{model="qwen",pool="shared"} QWEN
# HELP pagedkv_ledger_member_mapped_bytes Bytes one member of a ledger holds.
# TYPE pagedkv_ledger_member_mapped_bytes gauge
pagedkv_ledger_member_mapped_bytes{ledger="gpu0",member="qwen",pid="PID"} QWEN
`
	want = strings.NewReplacer("PID", strconv.Itoa(os.Getpid()), "LLAMA", strconv.FormatUint(m.Stats().MappedBytes, 10),
		"QWEN", strconv.FormatUint(pm.Stats().MappedBytes, 10)).Replace(want)
	require.NotZero(t, m.Stats().MappedBytes)
	require.NoError(t, testutil.CollectAndCompare(c, strings.NewReader(want), "pagedkv_mapped_bytes", "pagedkv_ledger_member_mapped_bytes"))
	require.NoError(t, c.Remove("llama"))
	require.Equal(t, 1, testutil.CollectAndCount(c, "pagedkv_mapped_bytes"))
	// The pool's model's first append created its sequence: one implicit sequence.
	require.NoError(t, testutil.CollectAndCompare(c, strings.NewReader(`
# HELP pagedkv_warnings_total Calls served that a runtime rarely means (kvcache.Warnings): appends that created a sequence, count-only appends to keyed sequences, prompts appended whole after a hit.
# TYPE pagedkv_warnings_total counter
pagedkv_warnings_total{kind="implicit_sequence",model="qwen",pool="shared"} 1
pagedkv_warnings_total{kind="repeated_prompt",model="qwen",pool="shared"} 0
pagedkv_warnings_total{kind="unkeyed_append",model="qwen",pool="shared"} 0
`), "pagedkv_warnings_total"))
}

// The core packages never pull in the Prometheus client: only this package does.
func TestCoreDoesNotImportPrometheus(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool to list dependencies")
	}
	out, err := exec.Command(goTool, "list", "-deps", "../vmm", "../kvcache", "../ledger", "../blocktable", "../sequence", "../kernels", "../prefix").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "github.com/pagedkv/pagedkv/kvcache")
	require.NotContains(t, string(out), "prometheus")
}

// A name breaking the naming rule (it would be a label value) is refused with a *NameError by
// every Add, and the collector collects nothing for it; a good name is added.
func TestAddNames(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer dev.Close()
	m, err := kvcache.New(dev, cfg())
	require.NoError(t, err)
	defer m.Close()
	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 8 << 20})
	require.NoError(t, err)
	defer pool.Close()
	l, err := ledger.Open(filepath.Join(t.TempDir(), "l"), ledger.Options{Limit: 8 << 20})
	require.NoError(t, err)
	defer l.Close()
	c := metrics.NewCollector()
	adds := map[string]func(name string) error{
		"model":  func(name string) error { return c.AddManager(name, m) },
		"pool":   func(name string) error { return c.AddSharedPool(name, pool) },
		"ledger": func(name string) error { return c.AddLedger(name, l) },
	}
	for what, add := range adds {
		for _, name := range []string{"", strings.Repeat("x", 64), strings.Repeat("\x00", 5000), "bad\xffutf8", "new\nline"} {
			err := add(name)
			var ne *kvcache.NameError
			require.ErrorAs(t, err, &ne, "%s %q", what, name)
			require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
			require.True(t, strings.HasPrefix(err.Error(), "metrics: add: "+what+" name "), err.Error())
			require.Zero(t, testutil.CollectAndCount(c), "a refused name adds nothing")
		}
	}
	require.NoError(t, c.AddManager("llama", m))
	require.NoError(t, c.AddLedger("gpu0", l))
	require.Equal(t, 1, testutil.CollectAndCount(c, "pagedkv_mapped_bytes"))
}

// The stores below the host tier get series of their own, labelled by medium: a disk tier's
// hits share pagedkv_prefix_hit_tokens_total with the GPU and the host (which no longer counts
// them), and its stored blocks and corrupt ones are counted.
func TestTierSeries(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	defer dev.Close()
	c := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16, PageSize: 64 << 10,
		Capacity: 16 * (64 << 10), NoBackground: true, HostBlocks: 64, HostPrefixCache: true}
	store, err := disk.Open(t.TempDir(), disk.Options{Fingerprint: c.Fingerprint(), BlockBytes: int(c.BlockStride()), LimitBytes: 64 << 20})
	require.NoError(t, err)
	defer store.Close()
	c.Tiers = []kvcache.Tier{{Store: store, Medium: "DISK"}}
	prompt := make([]prefix.Token, 65)
	for i := range prompt {
		prompt[i] = prefix.Token(i)
	}
	a, err := kvcache.New(dev, c)
	require.NoError(t, err)
	_, err = a.AppendTokenIDs(1, prompt, nil)
	require.NoError(t, err)
	require.NoError(t, a.FreeSequence(1))
	require.NoError(t, a.SyncTiers(context.Background()))
	require.NoError(t, a.Close())
	b, err := kvcache.New(dev, c) // a restart: only the disk holds the prompt
	require.NoError(t, err)
	defer b.Close()
	hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	require.Equal(t, 64, hit)

	col := metrics.NewCollector()
	require.NoError(t, col.AddManager("llama", b))
	want := `
# HELP pagedkv_prefix_hit_tokens_total Prompt tokens found in the prefix cache, by the tier they came from.
# TYPE pagedkv_prefix_hit_tokens_total counter
pagedkv_prefix_hit_tokens_total{model="llama",pool="",tier="disk"} 64
pagedkv_prefix_hit_tokens_total{model="llama",pool="",tier="gpu"} 0
pagedkv_prefix_hit_tokens_total{model="llama",pool="",tier="host"} 0
`
	require.NoError(t, testutil.CollectAndCompare(col, strings.NewReader(want), "pagedkv_prefix_hit_tokens_total"))
	require.Equal(t, 3, testutil.CollectAndCount(col, "pagedkv_prefix_hit_tokens_total"))
	require.Equal(t, 1, testutil.CollectAndCount(col, "pagedkv_tier_stored_blocks_total"))
	require.Equal(t, 1, testutil.CollectAndCount(col, "pagedkv_tier_corrupt_blocks_total"))
	require.Equal(t, 1, testutil.CollectAndCount(col, "pagedkv_tier_evicted_blocks_total"))
	require.Equal(t, 1, testutil.CollectAndCount(col, "pagedkv_tier_evictions_lost_total"))

	// The host tier's blocks by state: the disk's blocks came back through the host cache.
	st := b.Stats()
	require.Positive(t, st.Prefix.HostCachedBlocks)
	host := fmt.Sprintf(`
# HELP pagedkv_host_blocks Blocks of the host tier: all, and the free, swapped-out and cached ones, which add up to all.
# TYPE pagedkv_host_blocks gauge
pagedkv_host_blocks{model="llama",pool="",state="cached"} %d
pagedkv_host_blocks{model="llama",pool="",state="free"} %d
pagedkv_host_blocks{model="llama",pool="",state="swapped"} 0
pagedkv_host_blocks{model="llama",pool="",state="total"} 64
`, st.Prefix.HostCachedBlocks, 64-st.Prefix.HostCachedBlocks)
	require.NoError(t, testutil.CollectAndCompare(col, strings.NewReader(host), "pagedkv_host_blocks"))
}

// hybridGeometry is a small hybrid model: full attention, a sliding window and a recurrent
// state with checkpoints every 32 tokens.
func hybridGeometry() kvcache.Geometry {
	return kvcache.Geometry{Model: "tiny-hybrid", Layers: 3, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "window", Layers: []int{1}, Kind: kvcache.SlidingWindow, Window: 32, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "state", Layers: []int{2}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 32},
	}}
}

// A Hybrid's groups are models of a pool named for it, each with every series of a manager,
// the recurrent group's checkpoints among them.
func TestHybridSeries(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer dev.Close()
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: hybridGeometry(), Limit: 64 << 20, Capacity: 16 << 20, NoBackground: true})
	require.NoError(t, err)
	defer h.Close()
	ids := make([]kvcache.TokenID, 40)
	for i := range ids {
		ids[i] = kvcache.TokenID(i + 1)
	}
	_, err = h.AppendTokenIDs(1, ids[:32], make([][]int64, 3))
	require.NoError(t, err)
	require.NoError(t, h.MarkWritten(1, 32)) // a checkpoint at 32 tokens
	_, err = h.AppendTokenIDs(1, ids[32:], make([][]int64, 3))
	require.NoError(t, err)

	c := metrics.NewCollector()
	require.NoError(t, c.AddHybrid("gpt-hybrid", h))
	require.ErrorIs(t, c.AddManager("gpt-hybrid", h.Group(0)), kvcache.ErrExists, "one name, one object")
	problems, err := testutil.CollectAndLint(c)
	require.NoError(t, err)
	require.Empty(t, problems)
	st := h.Stats()
	want := fmt.Sprintf(`
# HELP pagedkv_mapped_bytes Physical memory the manager's arena has mapped.
# TYPE pagedkv_mapped_bytes gauge
pagedkv_mapped_bytes{model="full",pool="gpt-hybrid"} %d
pagedkv_mapped_bytes{model="state",pool="gpt-hybrid"} %d
pagedkv_mapped_bytes{model="window",pool="gpt-hybrid"} %d
# HELP pagedkv_checkpoints_total A recurrent-state group's checkpoints (kvcache.CheckpointStats): made by MarkWritten, skipped for want of memory, and starts resumed from one.
# TYPE pagedkv_checkpoints_total counter
pagedkv_checkpoints_total{model="full",outcome="made",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="full",outcome="resumed",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="full",outcome="skipped",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="state",outcome="made",pool="gpt-hybrid"} 1
pagedkv_checkpoints_total{model="state",outcome="resumed",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="state",outcome="skipped",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="window",outcome="made",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="window",outcome="resumed",pool="gpt-hybrid"} 0
pagedkv_checkpoints_total{model="window",outcome="skipped",pool="gpt-hybrid"} 0
`, st.Groups[0].MappedBytes, st.Groups[2].MappedBytes, st.Groups[1].MappedBytes)
	require.NotZero(t, st.Groups[1].MappedBytes)
	require.NoError(t, testutil.CollectAndCompare(c, strings.NewReader(want), "pagedkv_mapped_bytes", "pagedkv_checkpoints_total"))
	require.NoError(t, c.Remove("gpt-hybrid"))
	require.Zero(t, testutil.CollectAndCount(c, "pagedkv_mapped_bytes"))
}

// A Hybrid's groups each export the series of their own tiers (HybridConfig.Tiers): after a
// restart on disk tiers, the full group found the whole hit on disk and the window only the
// blocks its next token reads.
func TestHybridTierSeries(t *testing.T) {
	geom := hybridGeometry()
	geom.Layers, geom.Groups = 2, geom.Groups[:2] // full and window: no recurrent group, whose checkpoints never reach a tier
	dirs := []string{t.TempDir(), t.TempDir()}
	var stores []*disk.Store
	tiers := func(i int, _ kvcache.LayerGroup, fp tier.Fingerprint, blockBytes int) ([]kvcache.Tier, error) {
		s, err := disk.Open(dirs[i], disk.Options{Fingerprint: fp, BlockBytes: blockBytes, LimitBytes: 64 << 20})
		if err != nil {
			return nil, err
		}
		stores = append(stores, s)
		return []kvcache.Tier{{Store: s, Medium: "DISK"}}, nil
	}
	closeStores := func() {
		for _, s := range stores {
			require.NoError(t, s.Close())
		}
		stores = nil
	}
	prompt := make([]kvcache.TokenID, 65)
	for i := range prompt {
		prompt[i] = kvcache.TokenID(i + 1)
	}
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	defer dev.Close()
	cfg := kvcache.HybridConfig{Geometry: geom, Limit: 64 << 20, Capacity: 16 << 20, NoBackground: true, HostCacheTokens: 1024, Tiers: tiers}
	a, err := kvcache.NewHybrid(dev, cfg)
	require.NoError(t, err)
	_, err = a.AppendTokenIDs(1, prompt, make([][]int64, 2))
	require.NoError(t, err)
	require.NoError(t, a.FreeSequence(1))
	require.NoError(t, a.SyncTiers(context.Background()))
	require.NoError(t, a.Close())
	closeStores()

	b, err := kvcache.NewHybrid(dev, cfg) // a restart: only the disks hold the prompt
	require.NoError(t, err)
	defer closeStores()
	defer b.Close()
	hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	require.Equal(t, 64, hit)

	col := metrics.NewCollector()
	require.NoError(t, col.AddHybrid("gemma-like", b))
	want := `
# HELP pagedkv_prefix_hit_tokens_total Prompt tokens found in the prefix cache, by the tier they came from.
# TYPE pagedkv_prefix_hit_tokens_total counter
pagedkv_prefix_hit_tokens_total{model="full",pool="gemma-like",tier="disk"} 64
pagedkv_prefix_hit_tokens_total{model="full",pool="gemma-like",tier="gpu"} 0
pagedkv_prefix_hit_tokens_total{model="full",pool="gemma-like",tier="host"} 0
pagedkv_prefix_hit_tokens_total{model="window",pool="gemma-like",tier="disk"} 32
pagedkv_prefix_hit_tokens_total{model="window",pool="gemma-like",tier="gpu"} 0
pagedkv_prefix_hit_tokens_total{model="window",pool="gemma-like",tier="host"} 0
`
	require.NoError(t, testutil.CollectAndCompare(col, strings.NewReader(want), "pagedkv_prefix_hit_tokens_total"))
	require.Equal(t, 2, testutil.CollectAndCount(col, "pagedkv_tier_stored_blocks_total"))
}

// Geometry leaves group names free: groups that share a Name, or whose Name is another
// group's group-<index>, are labelled group-<index>, so that every group has series of its own
// and a scrape reports no duplicates.
func TestHybridGroupLabels(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer dev.Close()
	for _, tc := range []struct {
		names []string
		want  string
	}{
		{[]string{"attn", "attn", "state"}, `group-0 group-1 state`},
		{[]string{"", "group-0", "state"}, `group-0 group-1 state`},
		{[]string{"full", "window", "group-2"}, `full group-2 window`},
	} {
		geom := hybridGeometry()
		for i, n := range tc.names {
			geom.Groups[i].Name = n
		}
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Limit: 64 << 20, Capacity: 16 << 20, NoBackground: true})
		require.NoError(t, err)
		c := metrics.NewCollector()
		require.NoError(t, c.AddHybrid("h", h))
		reg := prometheus.NewPedanticRegistry()
		require.NoError(t, reg.Register(c))
		families, err := reg.Gather()
		require.NoError(t, err, "%q: no two groups share series", tc.names)
		var got []string
		for _, f := range families {
			if f.GetName() != "pagedkv_mapped_bytes" {
				continue
			}
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "model" {
						got = append(got, l.GetValue())
					}
				}
			}
		}
		require.Equal(t, tc.want, strings.Join(got, " "), "%q", tc.names)
		require.NoError(t, h.Close())
	}
}

// A ledger's member names come from a file other processes write: a member whose name there
// is not valid UTF-8 (a corrupted slot) is left out of the scrape, which neither panics nor
// fails, and its bytes still count in the ledger's used bytes.
func TestLedgerCorruptMemberName(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l, err := ledger.Open(path, ledger.Options{Limit: 8 << 20})
	require.NoError(t, err)
	defer l.Close()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer dev.Close()
	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
	require.NoError(t, err)
	defer pool.Close()
	var qwen *kvcache.Manager
	for _, name := range []string{"qwen", "llama-corrupted"} {
		pm, err := pool.Register(name, cfg())
		require.NoError(t, err)
		_, err = pm.AppendTokens(1, 10, nil)
		require.NoError(t, err)
		if qwen == nil {
			qwen = pm
		}
	}
	file, err := os.ReadFile(path)
	require.NoError(t, err)
	at := bytes.Index(file, []byte("llama-corrupted"))
	require.Positive(t, at)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xff}, int64(at)) // the shared mapping sees it
	require.NoError(t, err)
	require.NoError(t, f.Close())

	c := metrics.NewCollector()
	require.NoError(t, c.AddLedger("gpu0", l))
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	_, err = reg.Gather()
	require.NoError(t, err)
	used, mapped := l.Used(), qwen.Stats().MappedBytes
	require.Greater(t, used, mapped, "the corrupted member's bytes are counted")
	want := fmt.Sprintf(`
# HELP pagedkv_ledger_used_bytes Bytes all members of a ledger hold, over all processes.
# TYPE pagedkv_ledger_used_bytes gauge
pagedkv_ledger_used_bytes{ledger="gpu0"} %d
# HELP pagedkv_ledger_member_mapped_bytes Bytes one member of a ledger holds.
# TYPE pagedkv_ledger_member_mapped_bytes gauge
pagedkv_ledger_member_mapped_bytes{ledger="gpu0",member="qwen",pid="%d"} %d
`, used, os.Getpid(), mapped)
	require.NoError(t, testutil.CollectAndCompare(c, strings.NewReader(want), "pagedkv_ledger_used_bytes", "pagedkv_ledger_member_mapped_bytes"))
}
