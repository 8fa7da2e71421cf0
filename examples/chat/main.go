// Command chat is a chat loop over pagedkv, written the way a Go runtime would drive it with
// prefix caching: each user turn is a request that re-sends the whole conversation, as chat
// APIs do. StartSequence finds the part already in the cache (everything up to the previous
// answer, in whole blocks), the rest is appended with its ids and its K and V written
// (write_kv), then the answer is decoded token by token (AppendTokenIDs(seq, [id]), write_kv,
// attention through the exported block table, sample), and the request ends. Other traffic
// comes and goes between turns and the cache is compacted, so the cached blocks really move;
// /reset starts another conversation.
//
// The model (model.go) is tiny and deterministic but reads everything it says out of the cache,
// so a wrong block table shows up as wrong text. The loop checks each answer against the text
// and says whether it is right.
//
//	go run ./examples/chat                  # the demo conversation, then your turn if stdin is a terminal
//	go run ./examples/chat -script FILE     # one user message per line
//	go run ./examples/chat -turns 20        # 20 turns of the demo, no terminal needed
//	go run ./examples/chat -device cuda     # the same loop on the GPU
package main

import (
	"bufio"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"math/rand/v2"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

var demo = []string{
	"Hello, pagedkv!",
	"The cache is paged, the answers are read back from it.",
	"Blocks move; answers stay.",
	"/reset",
	"A fresh conversation after reset.",
	"Elastic memory: one mapping grows every layer.",
	"Goodbye!",
}

const (
	maxTokens  = 4096 // per conversation; /reset to go on
	maxMessage = 256
)

func main() {
	device := flag.String("device", "host", "host, cuda, cuda:N or auto")
	script := flag.String("script", "", "read user messages from this file, one per line")
	turns := flag.Int("turns", 0, "run this many turns of the demo conversation and exit")
	compact := flag.String("compact", "every", "compact between turns: every or never")
	background := flag.Int("background", 8, "other requests arriving between turns")
	flag.Parse()
	log.SetFlags(0)
	if *compact != "every" && *compact != "never" {
		log.Fatalf("chat: -compact must be every or never")
	}
	c, err := newChat(*device, *compact == "every", *background)
	if err != nil {
		log.Fatalf("chat: %v", err)
	}
	var lines []string
	interactive := false
	switch {
	case *script != "":
		b, err := os.ReadFile(*script)
		if err != nil {
			log.Fatalf("chat: %v", err)
		}
		lines = strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	case *turns > 0:
		for i := range *turns {
			lines = append(lines, demo[i%len(demo)])
		}
	default:
		lines = demo
		interactive = isTerminal(os.Stdin)
	}
	err = c.run(lines, os.Stdout)
	if err == nil && interactive {
		fmt.Println("\nYour turn (/reset starts over, /quit ends):")
		err = c.runInteractive(os.Stdin, os.Stdout)
	}
	if cerr := c.close(); err == nil {
		err = cerr
	}
	if err != nil {
		log.Fatalf("chat: %v", err)
	}
	fmt.Printf("\n%d of %d answers right.\n", c.right, c.answers)
	if c.right != c.answers {
		os.Exit(1)
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

type chat struct {
	dev     vmm.Device
	m       *kvcache.Manager
	k       *kernels.Kernels
	tables  *blocktable.DeviceTables
	vt      *blocktable.VLLM
	stage   *vmm.Pool
	keys    vmm.Addr // staging: key rows, value rows, slots, query, output
	vals    vmm.Addr
	slotBuf vmm.Addr
	q       vmm.Addr
	out     vmm.Addr
	compact bool

	seq       kvcache.SeqID // this turn's request
	conv      int           // conversation number (/reset starts the next)
	hist      []token       // the conversation so far, every token with its place
	cached    int           // tokens of this turn's prompt found in the cache
	turn      int
	prevFirst int // length of the first part of the previous answer
	prevText  string
	answer    []byte // this turn's answer so far

	bg      []kvcache.SeqID
	bgNext  kvcache.SeqID
	rng     *rand.Rand
	bgCount int

	answers, right int
	promptLen      int
	slots          []int64
	quiet          bool // the terminal already shows what the user typed
}

func newChat(device string, compact bool, background int) (*chat, error) {
	dev, err := vmm.Open(device)
	if err != nil {
		return nil, err
	}
	m, err := kvcache.New(dev, kvcache.Config{
		Layers: layers, KVHeads: 1, HeadDim: headDim, ElemSize: 2, BlockTokens: 16,
		PageSize: dev.Info().Granularity, Capacity: 1 << 30, ReservePages: 1, HighWatermark: 2, NoBackground: true,
		PrefixCacheBytes: 4 * dev.Info().Granularity, // room for the conversations' history
	})
	if err != nil {
		return nil, err
	}
	k, err := kernels.For(dev)
	if err != nil {
		return nil, err
	}
	maxBlocks := maxTokens / 16
	tables, err := blocktable.NewDeviceTables(dev, 1, maxBlocks, maxMessage)
	if err != nil {
		return nil, err
	}
	vt, err := blocktable.NewVLLM(1, maxBlocks, -1)
	if err != nil {
		return nil, err
	}
	g := dev.Info().Granularity
	stage, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: g, PageSize: g})
	if err != nil {
		return nil, err
	}
	base, err := stage.Map(0, g)
	if err != nil {
		return nil, err
	}
	row := uint64(2 * headDim)
	c := &chat{
		dev: dev, m: m, k: k, tables: tables, vt: vt, stage: stage, compact: compact,
		keys: base, vals: base + vmm.Addr(maxMessage*row), slotBuf: base + vmm.Addr(2*maxMessage*row),
		q: base + vmm.Addr(2*maxMessage*row+8*maxMessage), out: base + vmm.Addr(2*maxMessage*row+8*maxMessage+row),
		bgNext: 1 << 32, rng: rand.New(rand.NewPCG(42, 42)), bgCount: background,
	}
	fmt.Printf("pagedkv chat on %s (kernels: %s); %d layers, block 16 tokens, page %d MiB\n\n",
		dev.Info().Name, k.Image(), layers, m.Config().PageSize>>20)
	return c, nil
}

func (c *chat) close() error {
	var err error
	for _, e := range []error{c.m.Close(), c.tables.Close(), c.stage.Close(), c.k.Close(), c.dev.Close()} {
		if err == nil {
			err = e
		}
	}
	return err
}

func (c *chat) run(lines []string, w io.Writer) error {
	for _, l := range lines {
		if done, err := c.say(l, w); err != nil || done {
			return err
		}
	}
	return nil
}

func (c *chat) runInteractive(r io.Reader, w io.Writer) error {
	c.quiet = true
	sc := bufio.NewScanner(r)
	for {
		fmt.Fprint(w, "you> ")
		if !sc.Scan() {
			return sc.Err()
		}
		if done, err := c.say(sc.Text(), w); err != nil || done {
			return err
		}
	}
}

// say handles one line: a command or a user message.
func (c *chat) say(line string, w io.Writer) (done bool, err error) {
	line = strings.TrimSpace(line)
	switch {
	case line == "":
		return false, nil
	case line == "/quit" || line == "/exit":
		return true, nil
	case line == "/reset":
		c.conv++
		c.hist = c.hist[:0]
		c.turn, c.prevFirst, c.prevText = 0, 0, ""
		fmt.Fprintf(w, "-- reset: conversation %d starts --\n", c.conv+1)
		return false, nil
	}
	if len(line) > maxMessage/2 {
		line = line[:maxMessage/2]
	}
	if len(c.hist)+4*len(line)+64 > maxTokens {
		fmt.Fprintln(w, "-- the conversation is full; /reset to start another --")
		return false, nil
	}
	if !c.quiet {
		fmt.Fprintf(w, "you> %s\n", line)
	}
	if err := c.turnOf(line); err != nil {
		return false, err
	}
	want, first := expected(line, c.prevText)
	ok := string(c.answer) == want
	c.answers++
	verdict := "right"
	if ok {
		c.right++
	} else {
		verdict = fmt.Sprintf("WRONG, want %q", want)
	}
	fmt.Fprintf(w, "bot> %s\n", c.answer)
	c.prevText, c.prevFirst = first, len(line)

	moved := "no compaction"
	if err := c.traffic(); err != nil {
		return false, err
	}
	if c.compact {
		res, err := c.m.Compact(kvcache.CompactOptions{})
		if err != nil {
			return false, err
		}
		moved = fmt.Sprintf("compaction moved %d blocks, released %d pages", res.BlocksMoved, res.PagesReleased)
	}
	st := c.m.Stats()
	fmt.Fprintf(w, "     [%s; prompt %d tokens, %d from the cache; arena: %d sequences, %d pages mapped, %.1f MiB physical, %d blocks cached; %s]\n",
		verdict, c.promptLen, c.cached, st.Sequences, st.MappedPages, float64(st.MappedBytes)/(1<<20), st.Prefix.CachedBlocks, moved)
	c.turn++
	return false, nil
}

// token is one token of the conversation: its character and its place, which its K and V
// depend on.
type token struct {
	turn, who, index int
	ch               byte
}

// id is the token's id, what the prefix cache keys blocks by: the character, its role and its
// turn, as a chat template's role and turn markers would make them. Equal ids at equal places
// mean equal K and V, which is what makes a cached block valid for another request.
func (t token) id() kvcache.TokenID {
	return kvcache.TokenID(int(t.ch) | t.who<<8 | t.turn<<9 | 1<<30)
}

// turnOf runs one turn as one request: the whole conversation as the prompt (the cached part
// found, the rest prefilled), the answer decoded token by token, then the request ends.
func (c *chat) turnOf(msg string) error {
	n := len(msg)
	for i := range n {
		c.hist = append(c.hist, token{turn: c.turn, who: userTok, index: i, ch: msg[i]})
	}
	ids := make([]kvcache.TokenID, len(c.hist))
	for i, t := range c.hist {
		ids[i] = t.id()
	}
	c.seq++
	var err error
	if c.cached, err = c.m.StartSequence(c.seq, kvcache.Prompt{Tokens: ids}); err != nil {
		return err
	}
	c.promptLen = len(ids)
	if c.slots, err = c.m.AppendTokenIDs(c.seq, ids[c.cached:], c.slots[:0]); err != nil {
		return err
	}
	rest := c.hist[c.cached:]
	keys := make([]byte, 0, len(rest)*2*headDim)
	vals := make([]byte, 0, len(rest)*2*headDim)
	for _, t := range rest {
		keys = append(keys, key(t.turn, t.who, t.index)...)
		vals = append(vals, value(t.ch)...)
	}
	if err := c.writeKV(c.slots, keys, vals); err != nil {
		return err
	}
	defer c.m.FreeSequence(c.seq) // the request ends; its blocks stay cached for the next turn
	c.answer = c.answer[:0]
	for i := range n { // the message reversed, case swapped: read from layer 0
		ch, err := c.attend(0, key(c.turn, userTok, n-1-i))
		if err != nil {
			return err
		}
		if err := c.emit(swapCase(ch)); err != nil {
			return err
		}
	}
	if c.turn > 0 && c.prevFirst > 0 { // what it answered last time: read from layer 1
		for _, ch := range []byte(" (before: ") {
			if err := c.emit(ch); err != nil {
				return err
			}
		}
		for i := range c.prevFirst {
			ch, err := c.attend(1, key(c.turn-1, botTok, i))
			if err != nil {
				return err
			}
			if err := c.emit(ch); err != nil {
				return err
			}
		}
		if err := c.emit(')'); err != nil {
			return err
		}
	}
	return nil
}

// emit appends a generated token to the sequence and writes its K and V.
func (c *chat) emit(ch byte) error {
	t := token{turn: c.turn, who: botTok, index: len(c.answer), ch: ch}
	var err error
	c.slots, err = c.m.AppendTokenIDs(c.seq, []kvcache.TokenID{t.id()}, c.slots[:0])
	if err != nil {
		return err
	}
	if err := c.writeKV(c.slots, key(t.turn, t.who, t.index), value(ch)); err != nil {
		return err
	}
	c.hist = append(c.hist, t)
	c.answer = append(c.answer, ch)
	return nil
}

// writeKV stages rows of keys and values and scatters them into every layer with write_kv.
func (c *chat) writeKV(slots []int64, keys, vals []byte) error {
	sb := make([]byte, 8*len(slots))
	for i, s := range slots {
		binary.LittleEndian.PutUint64(sb[8*i:], uint64(s))
	}
	for _, cp := range []struct {
		dst vmm.Addr
		b   []byte
	}{{c.keys, keys}, {c.vals, vals}, {c.slotBuf, sb}} {
		if err := c.dev.CopyIn(cp.dst, cp.b); err != nil {
			return err
		}
	}
	cfg := c.m.Config()
	for l := range layers {
		if err := c.k.WriteKV(0, c.m.LayerBase(l, 0), c.m.LayerBase(l, 1), c.keys, c.vals, c.slotBuf, len(slots),
			cfg.TokenBytes(), cfg.BlockTokens, cfg.BlockStride()); err != nil {
			return err
		}
	}
	return c.k.Synchronize(0)
}

// attend runs decode attention for the conversation over one layer with query q, through the
// block table exported and uploaded for this step, and samples the character.
func (c *chat) attend(layer int, q []byte) (byte, error) {
	if err := c.m.ExportVLLM([]kvcache.SeqID{c.seq}, c.vt); err != nil {
		return 0, err
	}
	if err := c.tables.UploadVLLM(c.vt, nil); err != nil {
		return 0, err
	}
	if err := c.dev.CopyIn(c.q, q); err != nil {
		return 0, err
	}
	cfg := c.m.Config()
	if err := c.k.PagedAttention(0, kernels.Attention{
		Out: c.out, Q: c.q, KBase: c.m.LayerBase(layer, 0), VBase: c.m.LayerBase(layer, 1),
		BlockTables: c.tables.BlockTables, SeqLens: c.tables.SeqLens, NumSeqs: 1, MaxBlocks: c.vt.MaxBlocks,
		NumHeads: 1, KVHeads: 1, HeadDim: headDim, BlockTokens: cfg.BlockTokens, BlockStride: cfg.BlockStride(), Scale: scale,
	}); err != nil {
		return 0, err
	}
	if err := c.k.Synchronize(0); err != nil {
		return 0, err
	}
	raw := make([]byte, 4*headDim)
	if err := c.dev.CopyOut(raw, c.out); err != nil {
		return 0, err
	}
	out := make([]float32, headDim)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return decode(out), nil
}

// traffic lets other requests come and go between turns, so that pages fragment and a
// compaction has the conversation's blocks to move.
func (c *chat) traffic() error {
	for range c.bgCount {
		if _, err := c.m.AppendTokens(c.bgNext, 200+c.rng.IntN(1000), nil); err != nil {
			return err
		}
		c.bg = append(c.bg, c.bgNext)
		c.bgNext++
	}
	kept := c.bg[:0]
	for _, id := range c.bg {
		if c.rng.IntN(2) == 0 {
			if err := c.m.FreeSequence(id); err != nil {
				return err
			}
			continue
		}
		kept = append(kept, id)
	}
	c.bg = kept
	return nil
}
