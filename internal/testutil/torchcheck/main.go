// Command torchcheck runs the paged attention of package kernels over a set of cases and writes,
// per case, what a torch reference needs to recompute it: check.py in this folder reads the
// files, runs torch.nn.functional.scaled_dot_product_attention on them and reports the largest
// absolute difference (issue 18). The GPU machine has torch but no Go, so the binary is built
// here (scripts/gpu-build) and run there (scripts/torch-check).
//
//	.gpu/torchcheck -device cuda -out torch-out
//	python3 internal/testutil/torchcheck/check.py torch-out
//
// Each case writes random fp16 K and V through kernels.Write into blocks in shuffled order, runs
// PagedAttention through a vLLM block table and writes into <out>/<case>/:
//
//	case.json  the geometry, format, scales, mask parameters and sequence lengths
//	q.bin      Q, fp16 [sequences, heads, head dim]
//	k.bin      the stored K rows, read back through the block table: every sequence's tokens in
//	           order, sequences one after another, [tokens, KV heads, head dim] in the cache's
//	           format (fp16, or fp8 codes)
//	v.bin      the stored V rows, the same way (absent for MLA, whose V is K's first latent_dim)
//	out.bin    the kernel's output, fp32 [sequences, heads, head dim or latent dim]
//
// Everything is little-endian.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// attnCase is one attention configuration; it is also the content of case.json.
type attnCase struct {
	Name        string  `json:"name"`
	Heads       int     `json:"heads"`
	KVHeads     int     `json:"kv_heads"`
	HeadDim     int     `json:"head_dim"`
	LatentDim   int     `json:"latent_dim"` // MLA when > 0
	BlockTokens int     `json:"block_tokens"`
	Format      string  `json:"format"` // fp16, fp8_e4m3 or fp8_e5m2 (kernels.Format's names)
	Scale       float32 `json:"scale"`
	KScale      float32 `json:"k_scale"`
	VScale      float32 `json:"v_scale"`
	Window      int     `json:"window"`
	Sinks       int     `json:"sinks"`
	Chunk       int     `json:"chunk"`
	Lens        []int   `json:"lens"`
	Image       string  `json:"image"` // the kernels' image that ran (kernels.Image)
}

const (
	gqaScale = 0.08838834764831845 // 1/sqrt(128)
	mlaScale = 0.07216878364870322 // 1/sqrt(192): DeepSeek's softmax scale over 128+64
)

// cases cover lengths below, at and above each window and chunk, across the 16-token blocks.
var cases = []attnCase{
	{Name: "full-gqa", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp16", Scale: gqaScale,
		Lens: []int{0, 1, 15, 16, 17, 100}},
	{Name: "window", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp16", Scale: gqaScale,
		Window: 32, Lens: []int{1, 17, 31, 32, 33, 100, 257}},
	{Name: "window-sinks", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp16", Scale: gqaScale,
		Window: 32, Sinks: 4, Lens: []int{3, 32, 33, 36, 37, 100, 257}},
	{Name: "chunk", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp16", Scale: gqaScale,
		Chunk: 48, Lens: []int{1, 47, 48, 49, 96, 97, 257}},
	{Name: "fp8-e4m3", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp8_e4m3", Scale: gqaScale,
		KScale: 0.0173, VScale: 0.0291, Lens: []int{1, 16, 33, 100}},
	{Name: "fp8-e5m2-window-sinks", Heads: 8, KVHeads: 2, HeadDim: 128, BlockTokens: 16, Format: "fp8_e5m2", Scale: gqaScale,
		KScale: 0.0173, VScale: 0.0291, Window: 32, Sinks: 4, Lens: []int{1, 32, 33, 100}},
	{Name: "mla-fp16", Heads: 16, KVHeads: 1, HeadDim: 576, LatentDim: 512, BlockTokens: 16, Format: "fp16", Scale: mlaScale,
		Lens: []int{1, 16, 17, 200}},
	{Name: "mla-fp8-e4m3", Heads: 16, KVHeads: 1, HeadDim: 576, LatentDim: 512, BlockTokens: 16, Format: "fp8_e4m3", Scale: mlaScale,
		KScale: 0.0173, Lens: []int{1, 16, 17, 200}},
}

func main() {
	device := flag.String("device", "cuda", "host, cuda or cuda:N")
	out := flag.String("out", "torch-out", "folder to write the cases into")
	flag.Parse()
	dev, err := vmm.Open(*device)
	if err != nil {
		log.Fatalf("torchcheck: %v", err)
	}
	err = writeCases(dev, *out, cases)
	if cerr := dev.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		log.Fatalf("torchcheck: %v", err)
	}
}

// writeCases runs every case on dev and writes its files under dir.
func writeCases(dev vmm.Device, dir string, cs []attnCase) (err error) {
	k, err := kernels.For(dev)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := k.Close(); err == nil {
			err = cerr
		}
	}()
	for i, c := range cs {
		c.Image = string(k.Image())
		if err := runCase(dev, k, c, filepath.Join(dir, c.Name), uint64(i)); err != nil {
			return fmt.Errorf("case %s: %w", c.Name, err)
		}
	}
	return nil
}

// format returns the case's kernels.Format.
func (c attnCase) format() (kernels.Format, error) {
	for _, f := range []kernels.Format{kernels.FP16, kernels.FP8E4M3, kernels.FP8E5M2} {
		if f.String() == c.Format {
			return f, nil
		}
	}
	return 0, fmt.Errorf("format %q is none of fp16, fp8_e4m3, fp8_e5m2", c.Format)
}

// vDim returns the elements per head of V and of the output.
func (c attnCase) vDim() int {
	if c.LatentDim > 0 {
		return c.LatentDim
	}
	return c.HeadDim
}

// runCase writes the case's K and V, runs the attention and writes the case's files into dir.
func runCase(dev vmm.Device, k *kernels.Kernels, c attnCase, dir string, seed uint64) (err error) {
	f, err := c.format()
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(seed, 18))
	mla := c.LatentDim > 0
	cacheRow := f.Bytes() * c.KVHeads * c.HeadDim
	blockBytes := c.BlockTokens * cacheRow
	stride := 2 * blockBytes // K then V in each block
	if mla {
		stride = blockBytes // one latent row per token
	}
	numSeqs := len(c.Lens)

	// Each sequence takes its blocks from one shuffled list; slots follow the table.
	maxBlocks, nblocks := 1, 0
	for _, n := range c.Lens {
		nb := (n + c.BlockTokens - 1) / c.BlockTokens
		maxBlocks, nblocks = max(maxBlocks, nb), nblocks+nb
	}
	perm := r.Perm(nblocks)
	table := make([]byte, 4*numSeqs*maxBlocks)
	var slots []byte
	next := 0
	for s, n := range c.Lens {
		for i := range (n + c.BlockTokens - 1) / c.BlockTokens {
			binary.LittleEndian.PutUint32(table[4*(s*maxBlocks+i):], uint32(perm[next+i]))
		}
		for p := range n {
			slot := perm[next+p/c.BlockTokens]*c.BlockTokens + p%c.BlockTokens
			slots = binary.LittleEndian.AppendUint64(slots, uint64(slot))
		}
		next += (n + c.BlockTokens - 1) / c.BlockTokens
	}
	tokens := len(slots) / 8
	key, value := halfs(r, tokens*c.KVHeads*c.HeadDim), halfs(r, tokens*c.KVHeads*c.HeadDim)
	q := halfs(r, numSeqs*c.Heads*c.HeadDim)
	lens := make([]byte, 4*numSeqs)
	for s, n := range c.Lens {
		binary.LittleEndian.PutUint32(lens[4*s:], uint32(n))
	}
	outBytes := 4 * numSeqs * c.Heads * c.vDim()

	pool, addrs, err := stage(dev, make([]byte, max(nblocks, 1)*stride), key, value, slots, q, table, lens, make([]byte, outBytes))
	if err != nil {
		return err
	}
	defer func() {
		if cerr := pool.Close(); err == nil {
			err = cerr
		}
	}()
	arena := addrs[0]
	w := kernels.KVWrite{KBase: arena, VBase: arena + vmm.Addr(blockBytes), Key: addrs[1], Value: addrs[2], SlotMapping: addrs[3],
		NumTokens: tokens, RowBytes: uint64(2 * c.KVHeads * c.HeadDim), BlockTokens: c.BlockTokens, BlockStride: uint64(stride),
		Format: f, KScale: c.KScale, VScale: c.VScale}
	if mla {
		w.VBase, w.Value = 0, 0
	}
	if err := k.Write(0, w); err != nil {
		return err
	}
	a := kernels.Attention{Out: addrs[7], Q: addrs[4], KBase: w.KBase, VBase: w.VBase, BlockTables: addrs[5], SeqLens: addrs[6],
		NumSeqs: numSeqs, MaxBlocks: maxBlocks, NumHeads: c.Heads, KVHeads: c.KVHeads, HeadDim: c.HeadDim, BlockTokens: c.BlockTokens,
		BlockStride: uint64(stride), Scale: c.Scale, Window: c.Window, Sinks: c.Sinks, Chunk: c.Chunk,
		Format: f, KScale: c.KScale, VScale: c.VScale, LatentDim: c.LatentDim}
	if err := k.PagedAttention(0, a); err != nil {
		return err
	}
	if err := k.Synchronize(0); err != nil {
		return err
	}

	// Read back what the kernel saw: the arena and the table, as stored on the device.
	out, cache, storedTable := make([]byte, outBytes), make([]byte, max(nblocks, 1)*stride), make([]byte, len(table))
	for _, rd := range []struct {
		dst  []byte
		addr vmm.Addr
	}{{out, a.Out}, {cache, arena}, {storedTable, a.BlockTables}} {
		if err := dev.CopyOut(rd.dst, rd.addr); err != nil {
			return err
		}
	}
	files := map[string][]byte{"q.bin": q, "out.bin": out, "k.bin": rows(c, cache, storedTable, maxBlocks, stride, 0)}
	if !mla {
		files["v.bin"] = rows(c, cache, storedTable, maxBlocks, stride, blockBytes)
	}
	if files["case.json"], err = json.MarshalIndent(c, "", "  "); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// rows returns the cache rows at half (0: K, blockBytes: V) of every sequence's tokens in order,
// found through the block table.
func rows(c attnCase, cache, table []byte, maxBlocks, stride, half int) []byte {
	f, _ := c.format()
	row := f.Bytes() * c.KVHeads * c.HeadDim
	var b []byte
	for s, n := range c.Lens {
		for p := range n {
			blk := int(binary.LittleEndian.Uint32(table[4*(s*maxBlocks+p/c.BlockTokens):]))
			off := blk*stride + half + p%c.BlockTokens*row
			b = append(b, cache[off:off+row]...)
		}
	}
	return b
}

// halfs returns n random fp16 values in [-1, 1].
func halfs(r *rand.Rand, n int) []byte {
	b := make([]byte, 2*n)
	for i := range n {
		binary.LittleEndian.PutUint16(b[2*i:], kernels.HalfFromFloat32(float32(2*r.Float64()-1)))
	}
	return b
}

// stage maps one buffer holding each part at a 256-byte aligned offset and returns it with the
// parts' addresses. The caller closes the pool.
func stage(dev vmm.Device, parts ...[]byte) (*vmm.Pool, []vmm.Addr, error) {
	offs := make([]uint64, len(parts))
	total := uint64(0)
	for i, p := range parts {
		offs[i] = total
		total += (uint64(len(p)) + 255) / 256 * 256
	}
	g := dev.Info().Granularity
	size := max((total+g-1)/g*g, g)
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size})
	if err != nil {
		return nil, nil, err
	}
	base, err := pool.Map(0, size)
	if err != nil {
		return nil, nil, errors.Join(err, pool.Close())
	}
	addrs := make([]vmm.Addr, len(parts))
	for i, p := range parts {
		addrs[i] = base + vmm.Addr(offs[i])
		if len(p) == 0 {
			continue
		}
		if err := dev.CopyIn(addrs[i], p); err != nil {
			return nil, nil, errors.Join(err, pool.Close())
		}
	}
	return pool, addrs, nil
}
