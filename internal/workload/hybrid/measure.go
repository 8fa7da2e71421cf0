package hybrid

import (
	"fmt"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// Mapped is what a Hybrid maps for seqs sequences of tokens tokens each, on the host backend
// with the CUDA granularity (2 MiB), after the prompts were fed in 8,192-token steps, one token
// decoded, and a compaction: Bytes mapped in all, and each group's live blocks, blocks per page
// and page bytes, from which a packed arena's pages follow for more sequences.
type Mapped struct {
	Bytes  uint64
	Groups []GroupMapped
}

// GroupMapped is one group's share of a Mapped.
type GroupMapped struct {
	LiveBlocks, BlocksPerPage int
	PageBytes                 uint64
}

// Packed returns what the groups would map for times as many sequences, packed by compaction:
// ceil(times * live blocks / blocks per page) pages each.
func (m Mapped) Packed(times int) uint64 {
	var sum uint64
	for _, g := range m.Groups {
		blocks := uint64(times) * uint64(g.LiveBlocks)
		sum += (blocks + uint64(g.BlocksPerPage) - 1) / uint64(g.BlocksPerPage) * g.PageBytes
	}
	return sum
}

// Measure maps a Hybrid of geom for seqs sequences of tokens tokens each (see Mapped). Memory is
// mapped for real on the host backend (memfd pages that are never written take no RAM).
func Measure(geom kvcache.Geometry, tokens, seqs int) (Mapped, error) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 2 << 20, Capacity: 1 << 50})
	if err != nil {
		return Mapped{}, err
	}
	defer dev.Close()
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Limit: 1 << 50, Capacity: 1 << 44,
		ReservePages: -1, NoBackground: true})
	if err != nil {
		return Mapped{}, err
	}
	defer h.Close()
	dst := make([][]int64, h.Groups())
	for s := range seqs {
		for done := 0; done < tokens; {
			n := min(8192, tokens-1-done)
			if done == tokens-1 {
				n = 1
			}
			for i := range dst {
				dst[i] = dst[i][:0]
			}
			if dst, err = h.AppendTokens(kvcache.SeqID(s), n, dst); err != nil {
				return Mapped{}, fmt.Errorf("sequence %d after %d tokens: %w", s, done, err)
			}
			done += n
		}
	}
	if _, err := h.Compact(kvcache.CompactOptions{}); err != nil {
		return Mapped{}, err
	}
	if err := h.Settle(); err != nil {
		return Mapped{}, err
	}
	st := h.Stats()
	out := Mapped{Bytes: st.MappedBytes}
	for _, g := range st.Groups {
		out.Groups = append(out.Groups, GroupMapped{LiveBlocks: g.LiveBlocks, BlocksPerPage: g.BlocksPerPage, PageBytes: g.PageBytes})
	}
	return out, nil
}
