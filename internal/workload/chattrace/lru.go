package chattrace

import (
	"container/list"
	"fmt"

	"github.com/google/btree"

	"github.com/pagedkv/pagedkv/prefix"
)

// LRU is the yardstick: a prefix cache over blocks that evicts the least recently used idle
// cached block (vLLM v1's policy: blocks released tail first, evicted oldest first) whenever
// more than Cap idle blocks are cached (the cap kvcached puts on cached tokens). Blocks are
// allocated lowest id first, which packs them into pages as a page allocator does, and a page
// holds memory while any of its blocks is held or cached. It is a model of the policy, not of
// any device: it maps nothing.
type LRU struct {
	bt, bpp, cap int
	free         *btree.BTreeG[int32] // free block ids of pages made so far
	nblocks      int32
	used         []int // per page: blocks held or cached
	mapped       int
	refs         map[int32]int
	keyOf        map[int32]prefix.Key
	cached       map[prefix.Key]int32
	idle         *list.List // of int32 block ids, oldest first
	idleAt       map[int32]*list.Element
	reqs         map[uint64]*lruReq
	hasher       prefix.Hasher
	root         prefix.Key
	held         int
}

type lruReq struct {
	blocks []int32
	ids    []prefix.Token
	keys   []prefix.Key
}

// NewLRU returns the yardstick for blocks of blockTokens tokens, blocksPerPage to a page, that
// keeps at most capBlocks idle cached blocks.
func NewLRU(blockTokens, blocksPerPage, capBlocks int) *LRU {
	return &LRU{bt: blockTokens, bpp: blocksPerPage, cap: capBlocks, free: btree.NewG(32, func(a, b int32) bool { return a < b }),
		refs: map[int32]int{}, keyOf: map[int32]prefix.Key{}, cached: map[prefix.Key]int32{}, idle: list.New(),
		idleAt: map[int32]*list.Element{}, reqs: map[uint64]*lruReq{}, root: prefix.Root(prefix.Namespace{}, blockTokens)}
}

func (l *LRU) use(b int32, delta int) {
	p := int(b) / l.bpp
	for len(l.used) <= p {
		l.used = append(l.used, 0)
	}
	if l.used[p] == 0 && delta > 0 {
		l.mapped++
	}
	l.used[p] += delta
	if l.used[p] == 0 {
		l.mapped--
	}
}

func (l *LRU) alloc() int32 {
	b, ok := l.free.DeleteMin()
	if !ok { // a new page
		for i := range int32(l.bpp) {
			l.free.ReplaceOrInsert(l.nblocks + i)
		}
		l.nblocks += int32(l.bpp)
		b, _ = l.free.DeleteMin()
	}
	l.use(b, 1)
	l.refs[b] = 1
	l.held++
	return b
}

// Start implements Cache.
func (l *LRU) Start(id uint64, p []prefix.Token) (int, error) {
	if _, ok := l.reqs[id]; ok {
		return 0, fmt.Errorf("lru: request %d exists", id)
	}
	r := &lruReq{}
	l.reqs[id] = r
	parent := l.root
	for i := 0; len(p) > 0 && i < (len(p)-1)/l.bt; i++ {
		k := l.hasher.Next(parent, p[i*l.bt:(i+1)*l.bt])
		b, ok := l.cached[k]
		if !ok {
			break
		}
		if e, idle := l.idleAt[b]; idle {
			l.idle.Remove(e)
			delete(l.idleAt, b)
			l.held++
		}
		l.refs[b]++
		r.blocks, r.keys = append(r.blocks, b), append(r.keys, k)
		r.ids = append(r.ids, p[i*l.bt:(i+1)*l.bt]...)
		parent = k
	}
	return len(r.ids), nil
}

// Append implements Cache.
func (l *LRU) Append(id uint64, ids []prefix.Token) error {
	r, ok := l.reqs[id]
	if !ok {
		return fmt.Errorf("lru: no request %d", id)
	}
	r.ids = append(r.ids, ids...)
	for len(r.blocks)*l.bt < len(r.ids) {
		r.blocks = append(r.blocks, l.alloc())
	}
	for len(r.keys) < len(r.ids)/l.bt {
		i := len(r.keys)
		parent := l.root
		if i > 0 {
			parent = r.keys[i-1]
		}
		k := l.hasher.Next(parent, r.ids[i*l.bt:(i+1)*l.bt])
		r.keys = append(r.keys, k)
		if _, dup := l.cached[k]; !dup {
			if _, has := l.keyOf[r.blocks[i]]; !has {
				l.cached[k], l.keyOf[r.blocks[i]] = r.blocks[i], k
			}
		}
	}
	return nil
}

// Free implements Cache: blocks are released last first, so a request's tail is evicted
// before the prefix it shares; then idle blocks beyond the cap are evicted, oldest first.
func (l *LRU) Free(id uint64) error {
	r, ok := l.reqs[id]
	if !ok {
		return fmt.Errorf("lru: no request %d", id)
	}
	delete(l.reqs, id)
	for i := len(r.blocks) - 1; i >= 0; i-- {
		b := r.blocks[i]
		if l.refs[b]--; l.refs[b] > 0 {
			continue
		}
		delete(l.refs, b)
		l.held--
		if _, ok := l.keyOf[b]; ok {
			l.idleAt[b] = l.idle.PushBack(b)
		} else {
			l.release(b)
		}
	}
	for l.idle.Len() > l.cap {
		b := l.idle.Remove(l.idle.Front()).(int32)
		delete(l.idleAt, b)
		delete(l.cached, l.keyOf[b])
		delete(l.keyOf, b)
		l.release(b)
	}
	return nil
}

func (l *LRU) release(b int32) {
	l.use(b, -1)
	l.free.ReplaceOrInsert(b)
}

// Blocks implements Cache.
func (l *LRU) Blocks() (held, idle int) { return l.held, l.idle.Len() }

// MappedPages implements Cache: pages with any block held or cached.
func (l *LRU) MappedPages() int { return l.mapped }
