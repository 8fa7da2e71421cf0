package main

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/hybrid"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// memoryModels are the presets of the memory-per-model table.
var memoryModels = []string{"gpt-oss-120b", "gemma-3-27b", "llama-4-scout", "deepseek-v3", "qwen3-next-80b-a3b"}

// benchMemory maps each preset's layer groups for 1, 16 and 256 sequences of 8k, 32k and 128k
// tokens (host backend, 2 MiB granules; pages that are never written take no memory) and sets
// the bytes beside the minimum and the yardsticks: today's one-group layout, vLLM's hybrid
// allocator, ollama's sizing (internal/workload/hybrid). It needs no device of its own.
func benchMemory(_ vmm.Device, _ int) ([]Table, error) {
	t := Table{
		Title: "Memory per model: bytes mapped for S sequences of T tokens",
		Note: "Each preset's groups in arenas of their own (host backend, 2 MiB granules), each prompt fed in 8,192-token steps, one token decoded, then a compaction. " +
			"The minimum is every group's live tokens rounded to its blocks; the goal is at most 1.05x the minimum plus one page a group (the reserve after compaction). " +
			"256-sequence rows pack the 16-sequence run's blocks 16 times (compaction packs to ceil(blocks / blocks per page) pages: the file descriptors of 256 x 128k sequences' pages exceed the process limit). " +
			"Uniform: today's one-group Config (every layer full attention, K and V of the widest head, bf16); n/a where a recurrent layer cannot be described. " +
			"vLLM: its hybrid allocator's grouping, padding layers and unified page (attention blocks raised to hold a recurrent state). " +
			"Ollama: its Go engine's caches: gpt-oss's windows 4,096 tokens, Gemma 3's its window (each plus one 512-token batch), Llama 4's chunked layers every token, MLA's V stored beside K, Qwen3-Next's state in fp32 with 32 checkpoints.",
		Columns: []string{"model", "tokens", "seqs", "pagedkv", "minimum", "pagedkv / min", "goal", "uniform / pagedkv", "vLLM / pagedkv", "ollama / pagedkv"},
	}
	gib := func(b uint64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) }
	ratio := func(a, b uint64) string { return fmt.Sprintf("%.2fx", float64(a)/float64(b)) }
	for _, name := range memoryModels {
		g, err := kvcache.GeometryFor(name)
		if err != nil {
			return nil, err
		}
		for _, tokens := range []int{8 << 10, 32 << 10, 128 << 10} {
			var m16 hybrid.Mapped
			for _, seqs := range []int{1, 16, 256} {
				var m hybrid.Mapped
				mapped := uint64(0)
				switch seqs {
				case 256:
					mapped = m16.Packed(16)
				default:
					if m, err = hybrid.Measure(g, tokens, seqs); err != nil {
						return nil, fmt.Errorf("%s, %d tokens, %d sequences: %w", name, tokens, seqs, err)
					}
					mapped = m.Bytes
					if seqs == 16 {
						m16 = m
					}
				}
				minimum := hybrid.Minimum(g, tokens, seqs)
				var pages uint64
				for _, grp := range m16.Groups {
					pages += grp.PageBytes
				}
				if seqs != 256 {
					pages = 0
					for _, grp := range m.Groups {
						pages += grp.PageBytes
					}
				}
				goal := "met"
				if float64(mapped) > 1.05*float64(minimum)+float64(pages) {
					goal = "missed"
				}
				uni := "n/a"
				if u, ok := hybrid.Uniform(g, tokens, seqs); ok {
					uni = ratio(u, mapped)
				}
				v, _ := hybrid.VLLM(g, tokens, seqs)
				t.Rows = append(t.Rows, []string{name, fmt.Sprint(tokens), fmt.Sprint(seqs), gib(mapped), gib(minimum), ratio(mapped, minimum), goal,
					uni, ratio(v, mapped), ratio(hybrid.Ollama(g, tokens, seqs), mapped)})
			}
		}
	}
	return []Table{t}, nil
}
