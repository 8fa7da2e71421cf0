// Package tiertrace replays the multi-turn chat trace (package chattrace) on managers with
// stores below their host tier (kvcache.Config.Tiers): a process killed half-way and started
// again on the same disk tier (a warm restart), and replicas sharing one cluster tier with
// requests routed at random. Every token's K/V is written as the runtime would, and every
// hit is read back and checked, so a figure counts only blocks served intact.
package tiertrace

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// Config is the geometry of the experiments: small blocks (16 tokens of one layer and one
// head of 16, 1 KiB), a device arena of 16,384 blocks (the conversations of Trace need up to
// about 13,000 at its end), a host tier of 2,048; the tiers hold the rest. A tier call may take
// a second: the experiments count hits, and a loaded test machine (CI on 2 cores) may stall a
// loopback call past the default 50 ms, which costs a miss (counted in TierStats.Failures).
func Config() kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 16, ElemSize: 2, BlockTokens: 16,
		PageSize: 64 << 10, Capacity: 1 << 30, MemoryLimit: 256 * (64 << 10),
		HostBlocks: 2048, HostPrefixCache: true, TierTimeout: time.Second}
}

// Trace is the chat trace of the experiments: 64 conversations, all running from the start, of
// 8-12 turns over 8 system prompts of 300-1,200 tokens, so that half-way every conversation
// has a long history: a process started again without it recomputes each one once.
func Trace() chattrace.Options {
	return chattrace.Options{Conversations: 64, Concurrent: 64, SystemPrompts: 8, MinSystem: 300, MaxSystem: 1200,
		MinTurns: 8, MaxTurns: 12, MinUser: 30, MaxUser: 200, MinAnswer: 50, MaxAnswer: 200, Seed: 7}
}

// Replica is a manager on a host device of its own, its tiers borrowed.
type Replica struct {
	M   *kvcache.Manager
	dev vmm.Device
}

// NewReplica returns a replica of cfg (Config with its tiers).
func NewReplica(cfg kvcache.Config) (*Replica, error) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 31})
	if err != nil {
		return nil, err
	}
	m, err := kvcache.New(dev, cfg)
	if err != nil {
		_ = dev.Close()
		return nil, err
	}
	return &Replica{M: m, dev: dev}, nil
}

// Close closes the manager and its device.
func (r *Replica) Close() error {
	err := r.M.Close()
	if e := r.dev.Close(); err == nil {
		err = e
	}
	return err
}

// Checked is a chattrace.Cache over replicas: each request goes to one of them, drawn at random
// with Seed (no affinity: the first replica always, when there is one), it writes each
// appended token's value (its id) into the token's K/V as a runtime would, and reads back every
// hit: a hit whose K/V is not the prompt's is an error.
type Checked struct {
	Replicas []*Replica
	// Sync makes a replica write its tiers' queue before the trace goes on after a request
	// ends (kvcache.Manager.SyncTiers): a conversation's next turn comes after the user read
	// the answer, and a router does not hand it to another replica sooner.
	Sync bool
	Seed uint64
	// Before, when set, is called before each request starts, with the requests started
	// before it: where a test injects faults.
	Before func(started int)

	started int
	rng     *rand.Rand
	route   map[uint64]*Replica
	slots   []int64
	buf     [8]byte
}

func (c *Checked) of(id uint64) *Replica {
	if c.route == nil {
		c.route, c.rng = map[uint64]*Replica{}, rand.New(rand.NewPCG(c.Seed, 1))
	}
	r, ok := c.route[id]
	if !ok {
		r = c.Replicas[c.rng.IntN(len(c.Replicas))]
		c.route[id] = r
	}
	return r
}

// Start implements chattrace.Cache.
func (c *Checked) Start(id uint64, p []prefix.Token) (int, error) {
	if c.Before != nil {
		c.Before(c.started)
	}
	c.started++
	r := c.of(id)
	hit, err := r.M.StartSequence(kvcache.SeqID(id), kvcache.Prompt{Tokens: p})
	if err != nil || hit == 0 {
		return hit, err
	}
	if c.slots, err = r.M.Slots(kvcache.SeqID(id), 0, hit, c.slots[:0]); err != nil {
		return 0, err
	}
	for i, s := range c.slots {
		if err := c.token(r, s, func(dev vmm.Device, a vmm.Addr) error {
			if err := dev.CopyOut(c.buf[:], a); err != nil {
				return err
			}
			if v := binary.LittleEndian.Uint64(c.buf[:]); v != uint64(p[i])+1 {
				return fmt.Errorf("tiertrace: request %d: token %d of a hit holds %d, want %d", id, i, v, uint64(p[i])+1)
			}
			return nil
		}); err != nil {
			return 0, err
		}
	}
	return hit, nil
}

// Append implements chattrace.Cache.
func (c *Checked) Append(id uint64, ids []prefix.Token) error {
	r := c.of(id)
	var err error
	if c.slots, err = r.M.AppendTokenIDs(kvcache.SeqID(id), ids, c.slots[:0]); err != nil {
		return err
	}
	for i, s := range c.slots {
		binary.LittleEndian.PutUint64(c.buf[:], uint64(ids[i])+1)
		if err := c.token(r, s, func(dev vmm.Device, a vmm.Addr) error { return dev.CopyIn(a, c.buf[:]) }); err != nil {
			return err
		}
	}
	return nil
}

// token calls fn with the places of slot s's value: its first layer's K and last layer's V.
func (c *Checked) token(r *Replica, s int64, fn func(vmm.Device, vmm.Addr) error) error {
	bt := int64(r.M.Config().BlockTokens)
	b, off := int32(s/bt), uint64(s%bt)
	for _, sh := range r.M.Shards() {
		at := vmm.Addr(off * sh.Config.TokenBytes())
		if err := fn(sh.Device, sh.BlockAddr(sh.Layers[0], 0, b)+at); err != nil {
			return err
		}
		if err := fn(sh.Device, sh.BlockAddr(sh.Layers[1]-1, 1, b)+at); err != nil {
			return err
		}
	}
	return nil
}

// Free implements chattrace.Cache.
func (c *Checked) Free(id uint64) error {
	r := c.of(id)
	delete(c.route, id)
	if err := r.M.FreeSequence(kvcache.SeqID(id)); err != nil {
		return err
	}
	if c.Sync {
		return r.M.SyncTiers(context.Background())
	}
	return nil
}

// Blocks implements chattrace.Cache: the replicas' together.
func (c *Checked) Blocks() (held, idle int) {
	for _, r := range c.Replicas {
		st := r.M.Stats()
		held += st.LiveBlocks
		idle += st.Prefix.IdleBlocks
	}
	return held, idle
}

// MappedPages implements chattrace.Cache: the replicas' together.
func (c *Checked) MappedPages() int {
	n := 0
	for _, r := range c.Replicas {
		n += r.M.Stats().MappedPages
	}
	return n
}

// Steps returns the steps of trace o (a replay with no cache).
func Steps(o chattrace.Options) int {
	o.Skip, o.Stop = 1<<62, 0
	res, _ := chattrace.Run(nil, o, Config().BlockTokens)
	return res.Steps
}
