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
//	go run ./examples/chat -hybrid          # on a hybrid cache: a full-attention group and a sliding window
//
// With -hybrid the cache is a kvcache.Hybrid of two layer groups, gpt-oss style: the odd layers
// full attention, the even ones a sliding window of 64 tokens with 4 sink tokens. Each group
// gets its own slots, writes its own layers and attends through its own table with its own
// mask, and the window group frees the blocks that fall out of the window. The answer ends with
// what the window layers read (model.go), and each turn shows the blocks each group holds: the
// window group's stay bounded while the full group's grow with the conversation.
package main

import (
	"bufio"
	"encoding/binary"
	"errors"
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
	hybrid := flag.Bool("hybrid", false, "run on a hybrid cache: a full-attention group and a sliding-window group")
	flag.Parse()
	log.SetFlags(0)
	if *compact != "every" && *compact != "never" {
		log.Fatalf("chat: -compact must be every or never")
	}
	c, err := newChat(settings{device: *device, compact: *compact == "every", background: *background, hybrid: *hybrid})
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
	if err == nil && *hybrid {
		c.summary(os.Stdout)
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

// settings are the command line's choices.
type settings struct {
	device     string
	compact    bool // compact between every turn
	background int  // other requests arriving between turns
	hybrid     bool // a Hybrid of a full-attention and a sliding-window group
}

type chat struct {
	dev     vmm.Device
	cache   cache
	groups  []group // the cache's layer groups: one, or full attention and a window
	k       *kernels.Kernels
	stage   *vmm.Pool
	keys    vmm.Addr // staging: key rows, value rows, query, output (slots: per group)
	vals    vmm.Addr
	q       vmm.Addr
	out     vmm.Addr
	compact bool
	hybrid  bool
	roles   roles

	seq       kvcache.SeqID // this turn's request
	conv      int           // conversation number (/reset starts the next)
	hist      []token       // the conversation so far, every token with its place
	text      []byte        // the conversation as a right bot says it, for checking
	cached    int           // tokens of this turn's prompt found in the cache
	turn      int
	prevFirst int // length of the first part of the previous answer
	prevText  string
	answer    []byte // this turn's answer so far

	bg      []kvcache.SeqID
	bgNext  kvcache.SeqID
	bgDst   [][]int64
	rng     *rand.Rand
	bgCount int

	answers, right int
	promptLen      int
	dst            [][]int64 // each group's slots of the last append
	quiet          bool      // the terminal already shows what the user typed
}

// group is what the loop keeps of one layer group: its manager, its block table on the device,
// the staging of its slots, its attention mask, and the blocks this turn's request holds in it.
type group struct {
	m       *kvcache.Manager // owned by the cache
	tables  *blocktable.DeviceTables
	vt      *blocktable.VLLM
	slotBuf vmm.Addr
	window  int // the group's mask: its window and sink tokens (0 for full attention)
	sinks   int
	blocks  []int32 // scratch for Blocks
	held    int     // blocks the request holds at its end
	most    int     // the most it held after a decode step
}

func newChat(s settings) (*chat, error) {
	dev, err := vmm.Open(s.device)
	if err != nil {
		return nil, err
	}
	c := &chat{dev: dev, compact: s.compact, hybrid: s.hybrid, roles: plainRoles,
		bgNext: 1 << 32, rng: rand.New(rand.NewPCG(42, 42)), bgCount: s.background}
	if err := c.open(); err != nil {
		return nil, errors.Join(err, c.close())
	}
	return c, nil
}

// open makes the cache, the kernels, each group's tables and the staging.
func (c *chat) open() error {
	g := c.dev.Info().Granularity
	var err error
	if c.hybrid {
		c.roles = hybridRoles
		var h *kvcache.Hybrid
		h, err = kvcache.NewHybrid(c.dev, kvcache.HybridConfig{
			Geometry: hybridGeometry(), Limit: 1 << 30, Capacity: 1 << 30, ReservePages: 1, HighWatermark: 2,
			NoBackground: true, PrefixCacheBytes: 4 * g,
		})
		if err == nil {
			c.cache = h
		}
	} else {
		var m *kvcache.Manager
		m, err = kvcache.New(c.dev, kvcache.Config{
			Layers: layers, KVHeads: 1, HeadDim: headDim, ElemSize: 2, BlockTokens: 16,
			PageSize: g, Capacity: 1 << 30, ReservePages: 1, HighWatermark: 2, NoBackground: true,
			PrefixCacheBytes: 4 * g, // room for the conversations' history
		})
		if err == nil {
			c.cache = single{m}
		}
	}
	if err != nil {
		return err
	}
	if c.k, err = kernels.For(c.dev); err != nil {
		return err
	}
	if c.stage, err = vmm.NewPool(c.dev, vmm.PoolConfig{Capacity: g, PageSize: g}); err != nil {
		return err
	}
	base, err := c.stage.Map(0, g)
	if err != nil {
		return err
	}
	row := vmm.Addr(2 * headDim)
	c.keys, c.vals = base, base+maxMessage*row
	slots := base + 2*maxMessage*row // 8*maxMessage bytes for each group
	n := c.cache.Groups()
	c.q = slots + vmm.Addr(n*8*maxMessage)
	c.out = c.q + row
	maxBlocks := maxTokens / 16
	for i := range n {
		m := c.cache.Group(i)
		grp := group{m: m, slotBuf: slots + vmm.Addr(i*8*maxMessage), window: m.Config().Window, sinks: m.Config().Sinks}
		c.groups = append(c.groups, grp)
		if c.groups[i].tables, err = blocktable.NewDeviceTables(c.dev, 1, maxBlocks, maxMessage); err != nil {
			return err
		}
		if c.groups[i].vt, err = blocktable.NewVLLM(1, maxBlocks, -1); err != nil {
			return err
		}
	}
	c.dst, c.bgDst = make([][]int64, n), make([][]int64, n)
	c.banner()
	return nil
}

// banner prints what the chat runs on.
func (c *chat) banner() {
	cfg := c.groups[0].m.Config()
	if !c.hybrid {
		fmt.Printf("pagedkv chat on %s (kernels: %s); %d layers, block 16 tokens, page %d MiB\n\n",
			c.dev.Info().Name, c.k.Image(), layers, cfg.PageSize>>20)
		return
	}
	fmt.Printf("pagedkv chat on %s (kernels: %s); hybrid, %d layers, block 16 tokens:\n", c.dev.Info().Name, c.k.Image(), hybridLayers)
	for i, grp := range hybridGeometry().Groups {
		cfg := c.groups[i].m.Config()
		fmt.Printf("  group %d %-6s layers %v, %s attention", i, grp.Name, grp.Layers, grp.Kind)
		if grp.Window > 0 {
			fmt.Printf(" of %d tokens and %d sinks", grp.Window, grp.Sinks)
		}
		fmt.Printf(", page %d MiB (%d blocks)\n", cfg.PageSize>>20, cfg.PageSize/cfg.BlockStride())
	}
	fmt.Println()
}

// close releases everything newChat made; parts it did not make are skipped.
func (c *chat) close() error {
	var errs []error
	if c.cache != nil {
		errs = append(errs, c.cache.Close())
	}
	for _, g := range c.groups {
		if g.tables != nil {
			errs = append(errs, g.tables.Close())
		}
	}
	if c.stage != nil {
		errs = append(errs, c.stage.Close())
	}
	if c.k != nil {
		errs = append(errs, c.k.Close())
	}
	errs = append(errs, c.dev.Close())
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
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
		c.hist, c.text = c.hist[:0], c.text[:0]
		c.turn, c.prevFirst, c.prevText = 0, 0, ""
		fmt.Fprintf(w, "-- reset: conversation %d starts --\n", c.conv+1)
		return false, nil
	}
	if len(line) > maxMessage/2 {
		line = line[:maxMessage/2]
	}
	if len(c.hist)+answerBound(len(line), c.prevFirst) > maxTokens {
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
	c.text = append(c.text, line...)
	if c.hybrid {
		want += windowed(string(c.text) + want)
	}
	c.text = append(c.text, want...)
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
		res, err := c.cache.Compact(kvcache.CompactOptions{})
		if err != nil {
			return false, err
		}
		moved = fmt.Sprintf("compaction moved %d blocks, released %d pages", res.BlocksMoved, res.PagesReleased)
	}
	c.report(w, verdict, moved)
	c.turn++
	return false, nil
}

// report prints a turn's verdict, the prompt's tokens found in the cache, and what the arena
// (on a hybrid cache: each group) holds.
func (c *chat) report(w io.Writer, verdict, moved string) {
	if !c.hybrid {
		st := c.groups[0].m.Stats()
		fmt.Fprintf(w, "     [%s; prompt %d tokens, %d from the cache; arena: %d sequences, %d pages mapped, %.1f MiB physical, %d blocks cached; %s]\n",
			verdict, c.promptLen, c.cached, st.Sequences, st.MappedPages, float64(st.MappedBytes)/(1<<20), st.Prefix.CachedBlocks, moved)
		return
	}
	fmt.Fprintf(w, "     [%s; prompt %d tokens, %d from the cache; %s]\n", verdict, c.promptLen, c.cached, moved)
	for i, g := range c.groups {
		st := g.m.Stats()
		fmt.Fprintf(w, "     [%s: request %d blocks (at most %d while decoding); arena %d blocks held, %d cached, %.1f MiB mapped]\n",
			hybridGeometry().Groups[i].Name, g.held, g.most, st.LiveBlocks, st.Prefix.CachedBlocks, float64(st.MappedBytes)/(1<<20))
	}
}

// answerBound is the most tokens a turn adds to the conversation: the message, its reversal,
// the previous answer's first part in " (before: ...)" and what the window layers say.
func answerBound(msg, prevFirst int) int {
	return 2*msg + len(" (before: )") + prevFirst + windowedLen
}

// summary prints, after a hybrid run, what each group maps and holds: the blocks sequences hold
// and their bytes, against the pages mapped.
func (c *chat) summary(w io.Writer) {
	fmt.Fprintln(w, "\nLayer groups at the end:")
	var total uint64
	for i, g := range c.groups {
		st := g.m.Stats()
		total += st.MappedBytes
		held := float64(uint64(st.LiveBlocks)*g.m.Config().BlockStride()) / (1 << 20)
		fmt.Fprintf(w, "  %-6s %4d blocks held by %d sequences (%.1f MiB), %d cached; %.1f MiB mapped in %d pages of %d blocks\n",
			hybridGeometry().Groups[i].Name, st.LiveBlocks, st.Sequences, held, st.Prefix.CachedBlocks,
			float64(st.MappedBytes)/(1<<20), st.MappedPages, st.BlocksPerPage)
	}
	fmt.Fprintf(w, "  total  %.1f MiB mapped\n", float64(total)/(1<<20))
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

// key is the token's key (and the query that finds it).
func (t token) key() []byte { return key(t.turn, t.who, t.index) }

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
	if c.cached, err = c.cache.StartSequence(c.seq, kvcache.Prompt{Tokens: ids}); err != nil {
		return err
	}
	c.promptLen = len(ids)
	for i := range c.groups {
		c.groups[i].most = 0
	}
	if err := c.appendIDs(ids[c.cached:]); err != nil {
		return err
	}
	rest := c.hist[c.cached:]
	keys := make([]byte, 0, len(rest)*2*headDim)
	vals := make([]byte, 0, len(rest)*2*headDim)
	for _, t := range rest {
		keys = append(keys, t.key()...)
		vals = append(vals, value(t.ch)...)
	}
	if err := c.writeKV(keys, vals); err != nil {
		return err
	}
	defer c.cache.FreeSequence(c.seq) // the request ends; its blocks stay cached for the next turn
	c.answer = c.answer[:0]
	if err := c.decode(msg); err != nil {
		return err
	}
	return c.count(func(g *group, held int) { g.held = held })
}

// decode says the answer: the message reversed, case swapped, read from the reverse layer; from
// the second turn on what it answered last time, read from the before layer; and on a hybrid
// cache what the window layers read.
func (c *chat) decode(msg string) error {
	n := len(msg)
	for i := range n {
		ch, err := c.attend(c.roles.reverse, key(c.turn, userTok, n-1-i))
		if err != nil {
			return err
		}
		if err := c.emit(swapCase(ch)); err != nil {
			return err
		}
	}
	if c.turn > 0 && c.prevFirst > 0 {
		if err := c.emitText(" (before: "); err != nil {
			return err
		}
		for i := range c.prevFirst {
			ch, err := c.attend(c.roles.before, key(c.turn-1, botTok, i))
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
	if c.hybrid {
		return c.decodeWindowed()
	}
	return nil
}

// decodeWindowed says what the window layers read (see windowed): the sink tokens through the
// sinks layer, then the four oldest tokens inside the window through the edge layer.
func (c *chat) decodeWindowed() error {
	if err := c.emitText(" ["); err != nil {
		return err
	}
	for j := range sinks {
		ch, err := c.attend(c.roles.sinks, c.hist[j].key())
		if err != nil {
			return err
		}
		if err := c.emit(ch); err != nil {
			return err
		}
	}
	if err := c.emit('|'); err != nil {
		return err
	}
	oldest := max(0, len(c.hist)-window)
	for j := range edgeTokens {
		ch, err := c.attend(c.roles.edge, c.hist[oldest+j].key())
		if err != nil {
			return err
		}
		if err := c.emit(ch); err != nil {
			return err
		}
	}
	return c.emit(']')
}

// emitText emits fixed text, as a chat template's markup would be.
func (c *chat) emitText(s string) error {
	for _, ch := range []byte(s) {
		if err := c.emit(ch); err != nil {
			return err
		}
	}
	return nil
}

// emit appends a generated token to the sequence and writes its K and V.
func (c *chat) emit(ch byte) error {
	t := token{turn: c.turn, who: botTok, index: len(c.answer), ch: ch}
	if err := c.appendIDs([]kvcache.TokenID{t.id()}); err != nil {
		return err
	}
	if err := c.writeKV(t.key(), value(ch)); err != nil {
		return err
	}
	c.hist = append(c.hist, t)
	c.answer = append(c.answer, ch)
	return c.count(func(g *group, held int) { g.most = max(g.most, held) })
}

// appendIDs appends tokens to this turn's request, leaving each group's slots in c.dst.
func (c *chat) appendIDs(ids []kvcache.TokenID) error {
	for i := range c.dst {
		c.dst[i] = c.dst[i][:0]
	}
	var err error
	c.dst, err = c.cache.AppendTokenIDs(c.seq, ids, c.dst)
	return err
}

// count calls f with each group and the blocks the request holds in it (NullBlock, a block a
// window group freed, is not held).
func (c *chat) count(f func(g *group, held int)) error {
	for i := range c.groups {
		g := &c.groups[i]
		var err error
		if g.blocks, err = g.m.Blocks(c.seq, g.blocks[:0]); err != nil {
			return err
		}
		held := 0
		for _, b := range g.blocks {
			if b != kvcache.NullBlock {
				held++
			}
		}
		f(g, held)
	}
	return nil
}

// writeKV stages rows of keys and values and scatters them with write_kv into every layer of
// every group, through the group's own slots of the last append (c.dst), maxMessage rows at a
// time.
func (c *chat) writeKV(keys, vals []byte) error {
	row := 2 * headDim
	for lo := 0; lo < len(keys)/row; lo += maxMessage {
		hi := min(len(keys)/row, lo+maxMessage)
		if err := c.dev.CopyIn(c.keys, keys[lo*row:hi*row]); err != nil {
			return err
		}
		if err := c.dev.CopyIn(c.vals, vals[lo*row:hi*row]); err != nil {
			return err
		}
		for i, g := range c.groups {
			if err := c.writeGroup(g, c.dst[i][lo:hi]); err != nil {
				return err
			}
		}
	}
	return c.k.Synchronize(0)
}

// writeGroup writes the staged rows into every layer of group g at its slots.
func (c *chat) writeGroup(g group, slots []int64) error {
	sb := make([]byte, 8*len(slots))
	for i, s := range slots {
		binary.LittleEndian.PutUint64(sb[8*i:], uint64(s))
	}
	if err := c.dev.CopyIn(g.slotBuf, sb); err != nil {
		return err
	}
	cfg := g.m.Config()
	for l := range cfg.Layers {
		if err := c.k.Write(0, kernels.KVWrite{KBase: g.m.LayerBase(l, 0), VBase: g.m.LayerBase(l, 1), Key: c.keys,
			Value: c.vals, SlotMapping: g.slotBuf, NumTokens: len(slots), RowBytes: cfg.TokenBytes(),
			BlockTokens: cfg.BlockTokens, BlockStride: cfg.BlockStride(), Blocks: g.m.Layout().Blocks}); err != nil {
			return err
		}
	}
	return nil
}

// attend runs decode attention for the conversation over one layer with query q, through the
// layer's group's block table, exported and uploaded for this step, with the group's mask (a
// window and its sinks, or none), and samples the character.
func (c *chat) attend(l layer, q []byte) (byte, error) {
	g := c.groups[l.group]
	if err := g.m.ExportVLLM([]kvcache.SeqID{c.seq}, g.vt); err != nil {
		return 0, err
	}
	if err := g.tables.UploadVLLM(g.vt, nil); err != nil {
		return 0, err
	}
	if err := c.dev.CopyIn(c.q, q); err != nil {
		return 0, err
	}
	cfg := g.m.Config()
	if err := c.k.PagedAttention(0, kernels.Attention{
		Out: c.out, Q: c.q, KBase: g.m.LayerBase(l.index, 0), VBase: g.m.LayerBase(l.index, 1),
		BlockTables: g.tables.BlockTables, SeqLens: g.tables.SeqLens, NumSeqs: 1, MaxBlocks: g.vt.MaxBlocks,
		NumHeads: 1, KVHeads: 1, HeadDim: headDim, BlockTokens: cfg.BlockTokens, BlockStride: cfg.BlockStride(), Scale: scale,
		Window: g.window, Sinks: g.sinks, Blocks: g.m.Layout().Blocks,
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
// compaction has the conversation's blocks to move. On a hybrid cache each request also
// decodes its first token, which frees its prompt's blocks the window no longer reads, as a
// runtime's next step does.
func (c *chat) traffic() error {
	for range c.bgCount {
		if _, err := c.cache.AppendTokens(c.bgNext, 200+c.rng.IntN(1000), c.bgSlots()); err != nil {
			return err
		}
		if c.hybrid {
			if _, err := c.cache.AppendTokens(c.bgNext, 1, c.bgSlots()); err != nil {
				return err
			}
		}
		c.bg = append(c.bg, c.bgNext)
		c.bgNext++
	}
	kept := c.bg[:0]
	for _, id := range c.bg {
		if c.rng.IntN(2) == 0 {
			if err := c.cache.FreeSequence(id); err != nil {
				return err
			}
			continue
		}
		kept = append(kept, id)
	}
	c.bg = kept
	return nil
}

// bgSlots returns the slot lists for a background append; nobody writes their K and V.
func (c *chat) bgSlots() [][]int64 {
	for i := range c.bgDst {
		c.bgDst[i] = c.bgDst[i][:0]
	}
	return c.bgDst
}
