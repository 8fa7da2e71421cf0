package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// prefixConfig is the trace's geometry: 16-token blocks of 4 KiB, 64 to a 256 KiB page (the
// blocks per page of a 32-layer model's default page, scaled down in bytes).
func prefixConfig(cacheBytes uint64) kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, Capacity: 16384 * (256 << 10), ReservePages: 1, HighWatermark: 2,
		NoBackground: true, PrefixCacheBytes: cacheBytes}
}

// benchPrefix replays the multi-turn chat trace against the manager and against a plain LRU
// over blocks (the yardstick), at cache bounds of 10%, 25% and 50% of the working set, and times
// the prefix cache's hot paths.
func benchPrefix(_ vmm.Device, scale int) ([]Table, error) {
	o := chattrace.Issue()
	if scale == 0 {
		o.Conversations, o.Concurrent = 200, 32
	}
	cfg := prefixConfig(0)
	bt, stride := cfg.BlockTokens, cfg.BlockStride()
	bpp := int(cfg.PageSize / stride)
	// The working set: the blocks the running conversations' contexts need at the peak; the
	// trace gives it whatever the cache does. An unbounded LRU also gives the hit rate of a cache
	// that never evicts.
	ideal, err := chattrace.Run(chattrace.NewLRU(bt, bpp, 1<<30), o, bt)
	if err != nil {
		return nil, err
	}
	ws := ideal.PeakWorkingBlock
	t := Table{
		Title: "Prefix cache on a multi-turn chat trace: pagedkv against a plain LRU over blocks",
		Note: fmt.Sprintf("%d conversations of %d-%d turns (%d-%d user and %d-%d answer tokens a turn) over %d system prompts of %d-%d tokens, "+
			"%d running at once; 16-token blocks, %d to a page; working set %d blocks (%.0f MiB). The yardstick evicts the least recently "+
			"used idle block beyond the bound (vLLM's order, kvcached's cap) and allocates lowest first. 'end' is after every request has "+
			"ended: pages mapped / (ceil(cached blocks / blocks per page) + 1 reserve page). A cache that never evicts hits %.1f%%.",
			o.Conversations, o.MinTurns, o.MaxTurns, o.MinUser, o.MaxUser, o.MinAnswer, o.MaxAnswer, o.SystemPrompts, o.MinSystem, o.MaxSystem,
			o.Concurrent, bpp, ws, float64(uint64(ws)*stride)/(1<<20), 100*ideal.HitRate()),
		Columns: []string{"bound", "policy", "hit rate", "vs LRU", "peak mapped MiB", "end: cached blocks", "end: mapped pages", "end: pages / optimum"},
	}
	for _, pct := range []int{10, 25, 50} {
		capBlocks := ws * pct / 100
		lru := chattrace.NewLRU(bt, bpp, capBlocks)
		lr, err := chattrace.Run(lru, o, bt)
		if err != nil {
			return nil, err
		}
		_, lidle := lru.Blocks()
		ratio := func(pages, cached int) string {
			return fmt.Sprintf("%.3f", float64(pages)/float64((cached+bpp-1)/bpp+1))
		}
		t.Rows = append(t.Rows, []string{fmt.Sprintf("%d%%", pct), "LRU over blocks (yardstick)", fmt.Sprintf("%.2f%%", 100*lr.HitRate()), "1.000",
			fmt.Sprintf("%.0f", float64(uint64(lr.PeakMappedPages)*cfg.PageSize)/(1<<20)), fmt.Sprint(lidle), fmt.Sprint(lru.MappedPages()),
			ratio(lru.MappedPages(), lidle)})

		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
		if err != nil {
			return nil, err
		}
		m, err := kvcache.New(dev, prefixConfig(uint64(capBlocks)*stride))
		if err != nil {
			return nil, err
		}
		pr, err := chattrace.Run(&chattrace.Manager{M: m, Settle: true}, o, bt)
		if err != nil {
			return nil, err
		}
		st := m.Stats()
		endSettled := []string{fmt.Sprint(st.Prefix.IdleBlocks), fmt.Sprint(st.MappedPages), ratio(st.MappedPages, st.Prefix.IdleBlocks)}
		if _, err := m.Compact(kvcache.CompactOptions{}); err != nil {
			return nil, err
		}
		cs := m.Stats()
		t.Rows = append(t.Rows, []string{fmt.Sprintf("%d%%", pct), "pagedkv", fmt.Sprintf("%.2f%%", 100*pr.HitRate()),
			fmt.Sprintf("%.3f", pr.HitRate()/lr.HitRate()), fmt.Sprintf("%.0f", float64(uint64(pr.PeakMappedPages)*cfg.PageSize)/(1<<20)),
			endSettled[0], endSettled[1], endSettled[2]})
		t.Rows = append(t.Rows, []string{fmt.Sprintf("%d%%", pct), "pagedkv, then Compact", "", "", "",
			fmt.Sprint(cs.Prefix.IdleBlocks), fmt.Sprint(cs.MappedPages), ratio(cs.MappedPages, cs.Prefix.IdleBlocks)})
		if err := m.Close(); err != nil {
			return nil, err
		}
		if err := dev.Close(); err != nil {
			return nil, err
		}
	}

	hot, err := hotPathsApart()
	if err != nil {
		return nil, err
	}
	return append([]Table{t}, hot...), nil
}

// prefixHotPaths times the prefix cache's hot paths, each beside a yardstick measured in the
// same run: the issue's absolute targets, and the ratios that carry from machine to machine.
func prefixHotPaths() (Table, error) {
	hot := Table{
		Title: "Prefix cache hot paths (host backend)",
		Note: "A 4,096-token prompt cached whole (255 blocks found); the decode step of 256 sequences with ids at a 0% hit rate " +
			"(every block hashed, cached and later evicted) against AppendTokens. Yardsticks, same run: Go-map lookups of the 255 " +
			"keys a start finds (map[prefix.Key]int32), SHA-256 of the same 255 blocks done the plainest way (append parent key " +
			"and ids, sha256.Sum256), and the decode step without ids. Each operation and its yardstick run in turn " +
			fmt.Sprintf("%d times; the figures are the medians. Ratio = measured / yardstick. The ratio targets are the ", hotRounds) +
			"issue's absolute targets over the yardsticks on the 2-core development machine (about 5 us and 50 us), so they hold " +
			"where the absolute ones do there; the hashing start cannot beat SHA-256 itself.",
		Columns: []string{"operation", "measured", "yardstick", "ratio", "target", "ratio target", "allocs/op"},
	}
	for _, c := range []struct {
		name, yardstick, target, ratioTarget string
		fn, yard                             func(*testing.B)
	}{
		{"StartSequence, keys given", "255 map lookups", "<= 10 us", "<= 2.0", func(b *testing.B) { kvbench.StartCached(b, true) }, kvbench.MapLookups},
		{"StartSequence, hashing", "255 SHA-256", "<= 60 us", "<= 1.2", func(b *testing.B) { kvbench.StartCached(b, false) }, kvbench.HashBlocks},
	} {
		ns, yns, allocs, _, err := inTurn(c.fn, c.yard)
		if err != nil {
			return hot, err
		}
		hot.Rows = append(hot.Rows, []string{c.name, fmt.Sprintf("%.1f us", ns/1e3), fmt.Sprintf("%s: %.1f us", c.yardstick, yns/1e3),
			fmt.Sprintf("%.2f", ns/yns), c.target, c.ratioTarget, fmt.Sprint(allocs)})
	}
	ins, cns, allocs, callocs, err := inTurn(func(b *testing.B) { kvbench.Decode(b, 1024, true) }, func(b *testing.B) { kvbench.Decode(b, 1024, false) })
	if err != nil {
		return hot, err
	}
	hot.Rows = append(hot.Rows,
		[]string{"decode, AppendTokens", fmt.Sprintf("%.1f ns/token", cns), "", "", "", "", fmt.Sprint(callocs)},
		[]string{"decode, AppendTokenIDs", fmt.Sprintf("%.1f ns/token (+%.1f)", ins, ins-cns), fmt.Sprintf("AppendTokens: %.1f ns/token", cns),
			fmt.Sprintf("%.2f", ins/cns), "<= +50 ns/token", "", fmt.Sprint(allocs)})
	return hot, nil
}

// hotRounds is how many times prefixHotPaths runs each operation and its yardstick, in turn.
const hotRounds = 3

// inTurn runs fn and its yardstick yard in turn hotRounds times, so that a change of load on
// the machine falls on both, and returns the median ns/op and the most allocs/op of each.
func inTurn(fn, yard func(*testing.B)) (ns, yns float64, allocs, yallocs int64, err error) {
	var a, y []float64
	for range hotRounds {
		r, ry := testing.Benchmark(fn), testing.Benchmark(yard)
		if r.N == 0 || ry.N == 0 {
			return 0, 0, 0, 0, fmt.Errorf("prefix hot paths: a benchmark failed")
		}
		a = append(a, float64(r.T.Nanoseconds())/float64(r.N))
		y = append(y, float64(ry.T.Nanoseconds())/float64(ry.N))
		allocs, yallocs = max(allocs, r.AllocsPerOp()), max(yallocs, ry.AllocsPerOp())
	}
	slices.Sort(a)
	slices.Sort(y)
	return a[hotRounds/2], y[hotRounds/2], allocs, yallocs, nil
}

// hotChildEnv makes the bench program a process that measures the prefix cache's hot paths and
// writes their table as JSON: benchPrefix measures them apart from the chat trace it has just
// replayed, whose heap and mappings slowed the same operations by 20-50% in its own process
// (the decode step's +38 ns/token became +55 to +63 on the 2-core development machine).
const hotChildEnv = "PAGEDKV_BENCH_HOT_CHILD"

// hotPathsApart runs prefixHotPaths and hybridHotPaths in a process of their own and returns
// their tables.
func hotPathsApart() ([]Table, error) {
	var t []Table
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), hotChildEnv+"=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return t, fmt.Errorf("prefix hot paths, in a process of their own: %w", err)
	}
	if err := json.Unmarshal(out, &t); err != nil {
		return t, fmt.Errorf("prefix hot paths: %q: %w", out, err)
	}
	return t, nil
}

// hotChild measures the hot paths and writes their tables to standard output, when the process
// was started as hotPathsApart's child; it reports whether it was.
func hotChild() (bool, error) {
	if os.Getenv(hotChildEnv) == "" {
		return false, nil
	}
	t, err := prefixHotPaths()
	if err != nil {
		return true, err
	}
	h, err := hybridHotPaths()
	if err != nil {
		return true, err
	}
	return true, json.NewEncoder(os.Stdout).Encode([]Table{t, h})
}

// hybridHotPaths times a Hybrid's hot paths (kvbench.HybridGeometry: full attention, a
// 128-token window and 8,192-token chunks, 16-token blocks) beside the same operation on one
// full-attention manager, in turn, in the same run.
func hybridHotPaths() (Table, error) {
	t := Table{
		Title: "Hybrid hot paths (host backend): three layer groups against one",
		Note: "The decode step of 256 sequences (kvbench.HybridDecode: AppendTokens of one token in every group, the window dropping a block " +
			"every 16 tokens; with ids, every block keyed and cached, the groups of one block size sharing one key chain) and the start of a " +
			"cached 4,096-token prompt, on a Hybrid of three groups (full, a 128-token window, 8,192-token chunks) against the same on one " +
			"full-attention manager (the decode steps on both sides with a watermark that keeps the batch's pages mapped, kvbench.HeldConfig, so that neither maps in the timed steps). " +
			fmt.Sprintf("Each runs in turn with its yardstick %d times; medians. Target: at most 2x.", hotRounds),
		Columns: []string{"operation", "three groups", "one group", "ratio", "target", "allocs/op"},
	}
	for _, c := range []struct {
		name, unit string
		div        float64
		fn, yard   func(*testing.B)
	}{
		{"decode step", "ns/token", 1, kvbench.HybridDecode, func(b *testing.B) { kvbench.OneGroupDecode(b, false) }},
		{"decode step with ids", "ns/token", 1, kvbench.HybridDecodeIDs, func(b *testing.B) { kvbench.OneGroupDecode(b, true) }},
		{"start, keys given", "us", 1e3, func(b *testing.B) { kvbench.HybridStartCached(b, true) }, func(b *testing.B) { kvbench.StartCached(b, true) }},
		{"start, hashing", "us", 1e3, func(b *testing.B) { kvbench.HybridStartCached(b, false) }, func(b *testing.B) { kvbench.StartCached(b, false) }},
	} {
		ns, yns, allocs, _, err := inTurn(c.fn, c.yard)
		if err != nil {
			return t, err
		}
		t.Rows = append(t.Rows, []string{c.name, fmt.Sprintf("%.1f %s", ns/c.div, c.unit), fmt.Sprintf("%.1f %s", yns/c.div, c.unit),
			fmt.Sprintf("%.2f", ns/yns), "<= 2.0", fmt.Sprint(allocs)})
	}
	return t, nil
}
