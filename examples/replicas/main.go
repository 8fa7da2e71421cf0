// Command replicas runs a small fleet: two replica processes of one model, each a pagedkv
// manager with a host prefix cache and a cluster tier on one Redis (package tier/redis), and a
// router that sends every turn of a set of conversations to a replica drawn at random, with no
// affinity. A turn whose conversation ran on the other replica before still finds its history:
// the other replica wrote its blocks to Redis, and this one brings them back through its host
// tier. Each replica writes every token's K/V and checks every hit it reads back.
//
//	go run ./examples/replicas                       # starts its own redis-server on a free port
//	go run ./examples/replicas -redis 127.0.0.1:6379 # uses a running Redis
//	go run ./examples/replicas -redis none           # the same fleet without the cluster tier
//
// It needs Debian's redis-server (apt-get install redis-server) unless -redis names a server.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier/redis"
	"github.com/pagedkv/pagedkv/vmm"
)

// The conversations: each a system prompt of one of two families and turns of a user message
// and an answer, every token drawn from the conversation's own seed, so that the router and
// the replicas agree on every prompt without sending it.
const (
	conversations = 12
	turns         = 6
)

// replicaEnv, set to the Redis address, makes a process a replica (the router starts them).
const replicaEnv = "PAGEDKV_REPLICA_REDIS"

func main() {
	log.SetFlags(0)
	replicaMain()
	addr := flag.String("redis", "", "the Redis server's host:port; empty: start redis-server; none: no cluster tier")
	replicas := flag.Int("replicas", 2, "replica processes")
	seed := flag.Uint64("seed", 1, "the routing's seed")
	flag.Parse()
	if err := route(*addr, *replicas, *seed, os.Stdout); err != nil {
		log.Fatalf("replicas: %v", err)
	}
}

// replicaMain serves as a replica and exits, when the process was started as one.
func replicaMain() {
	addr, ok := os.LookupEnv(replicaEnv)
	if !ok {
		return
	}
	if err := serve(addr, os.Stdin, os.Stdout); err != nil {
		log.Fatalf("replica: %v", err)
	}
	os.Exit(0)
}

// route starts Redis (unless given) and the replica processes, sends each turn of every
// conversation to a replica drawn at random, and prints what each found cached.
func route(addr string, n int, seed uint64, out io.Writer) error {
	if addr == "" {
		srv, a, err := startRedis()
		if err != nil {
			return err
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		addr = a
		fmt.Fprintf(out, "started redis-server on %s\n", addr)
	}
	procs := make([]*replica, n)
	for i := range procs {
		p, err := startReplica(addr)
		if err != nil {
			return err
		}
		defer p.stop()
		procs[i] = p
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	var query, hit int
	for t := range turns {
		for c := range conversations {
			i := rng.IntN(n)
			q, h, err := procs[i].turn(c, t)
			if err != nil {
				return fmt.Errorf("replica %d: %w", i, err)
			}
			query, hit = query+q, hit+h
			fmt.Fprintf(out, "conversation %2d turn %d -> replica %d: %4d of %4d prompt tokens cached\n", c, t, i, h, q)
		}
	}
	fmt.Fprintf(out, "%d of %d prompt tokens (%.1f%%) served from a cache, every hit's K/V checked\n", hit, query, 100*float64(hit)/float64(query))
	return nil
}

// startRedis starts redis-server on a free loopback port, without persistence.
func startRedis() (*exec.Cmd, string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru")
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("start redis-server (apt-get install redis-server, or give -redis): %w", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			_ = c.Close()
			return cmd, addr, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	return nil, "", fmt.Errorf("redis-server did not listen on %s", addr)
}

// replica is a replica process, driven over its stdin and stdout.
type replica struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startReplica(addr string) (*replica, error) {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), replicaEnv+"="+addr)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &replica{cmd: cmd, in: in, out: bufio.NewScanner(out)}, nil
}

// turn asks the replica to serve turn t of conversation c and returns its prompt's tokens and
// the cached ones.
func (r *replica) turn(c, t int) (query, hit int, err error) {
	if _, err := fmt.Fprintf(r.in, "%d %d\n", c, t); err != nil {
		return 0, 0, err
	}
	if !r.out.Scan() {
		return 0, 0, errors.New("the replica exited")
	}
	if _, err := fmt.Sscanf(r.out.Text(), "%d %d", &query, &hit); err != nil {
		return 0, 0, fmt.Errorf("%q: %w", r.out.Text(), err)
	}
	return query, hit, nil
}

func (r *replica) stop() {
	_ = r.in.Close()
	_ = r.cmd.Wait()
}

// config is the replicas' model: one layer, one KV head of 64, 16-token blocks.
func config() kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 64 << 10, Capacity: 256 * (64 << 10), HostBlocks: 512, HostPrefixCache: true,
		TierTimeout: time.Second} // Redis on this machine: a call late by a second is a busy machine, not a lost server
}

// serve is a replica: a manager on the host backend with a cluster tier on Redis at addr
// ("none": without), serving the turns it reads, one a line, until its input ends.
func serve(addr string, in io.Reader, out io.Writer) error {
	cfg := config()
	if addr != "none" {
		store, err := redis.Open(redis.Options{Addrs: []string{addr}, Model: "replicas-demo",
			Fingerprint: cfg.Fingerprint(), BlockBytes: int(cfg.BlockStride())})
		if err != nil {
			return err
		}
		defer store.Close()
		cfg.Tiers = []kvcache.Tier{{Store: store, Medium: "CLUSTER"}}
	}
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	if err != nil {
		return err
	}
	defer dev.Close()
	m, err := kvcache.New(dev, cfg)
	if err != nil {
		return err
	}
	defer m.Close()
	lines := bufio.NewScanner(in)
	for seq := kvcache.SeqID(1); lines.Scan(); seq++ {
		var c, t int
		if _, err := fmt.Sscanf(lines.Text(), "%d %d", &c, &t); err != nil {
			return fmt.Errorf("%q: %w", lines.Text(), err)
		}
		prompt, answer := conversation(c, t)
		hit, err := m.StartSequence(seq, kvcache.Prompt{Tokens: prompt})
		if err != nil {
			return err
		}
		if err := check(m, seq, prompt[:hit]); err != nil {
			return err
		}
		if err := appendWritten(m, seq, prompt[hit:]); err != nil {
			return err
		}
		for _, id := range answer { // decode
			if err := appendWritten(m, seq, []prefix.Token{id}); err != nil {
				return err
			}
		}
		if err := m.FreeSequence(seq); err != nil {
			return err
		}
		// The turn's blocks reach Redis before the user's next message can: the router
		// may send it to the other replica.
		if err := m.SyncTiers(context.Background()); err != nil {
			return err
		}
		fmt.Fprintf(out, "%d %d\n", len(prompt), hit)
	}
	return lines.Err()
}

// conversation returns turn t's prompt of conversation c (its system prompt, then every
// earlier turn's message and answer, then this turn's message) and this turn's answer.
func conversation(c, t int) (prompt, answer []prefix.Token) {
	rng := rand.New(rand.NewPCG(uint64(c%2), 0)) // two families of system prompts
	for range 300 {
		prompt = append(prompt, prefix.Token(rng.IntN(50000)))
	}
	rng = rand.New(rand.NewPCG(uint64(c)+100, 1))
	for i := 0; ; i++ {
		for range 20 + rng.IntN(60) { // the user's message
			prompt = append(prompt, prefix.Token(rng.IntN(50000)))
		}
		answer = answer[:0]
		for range 30 + rng.IntN(90) {
			answer = append(answer, prefix.Token(rng.IntN(50000)))
		}
		if i == t {
			return prompt, answer
		}
		prompt = append(prompt, answer...)
	}
}

// appendWritten appends ids to seq and writes each token's K/V: its id, in its first K row (what
// a runtime's write_kv does, in one value a token).
func appendWritten(m *kvcache.Manager, seq kvcache.SeqID, ids []prefix.Token) error {
	slots, err := m.AppendTokenIDs(seq, ids, nil)
	if err != nil {
		return err
	}
	sh := m.Shards()[0]
	for i, s := range slots {
		if err := sh.Device.CopyIn(tokenAddr(m, s), binary.LittleEndian.AppendUint32(nil, uint32(ids[i]))); err != nil {
			return err
		}
	}
	return nil
}

// check reads back the K/V of the tokens seq found cached: each must be its id.
func check(m *kvcache.Manager, seq kvcache.SeqID, ids []prefix.Token) error {
	slots, err := m.Slots(seq, 0, len(ids), nil)
	if err != nil {
		return err
	}
	sh := m.Shards()[0]
	var b [4]byte
	for i, s := range slots {
		if err := sh.Device.CopyOut(b[:], tokenAddr(m, s)); err != nil {
			return err
		}
		if got := prefix.Token(binary.LittleEndian.Uint32(b[:])); got != ids[i] {
			return fmt.Errorf("sequence %d: cached token %d holds %d, want %d", seq, i, got, ids[i])
		}
	}
	return nil
}

// tokenAddr is where slot s's value lives: the first layer's K row of its token.
func tokenAddr(m *kvcache.Manager, s int64) vmm.Addr {
	sh := m.Shards()[0]
	bt := int64(sh.Config.BlockTokens)
	return sh.BlockAddr(0, 0, int32(s/bt)) + vmm.Addr(uint64(s%bt)*sh.Config.TokenBytes())
}
