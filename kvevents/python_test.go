package kvevents

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/pyclient"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// subscriberPy reads a publisher's stream as vLLM's example subscriber does
// (examples/online_serving/kv_events_subscriber.py), with Debian's pyzmq and msgpack: a SUB
// socket for the stream, and on a gap in the sequence numbers a replay of the missed range
// from a DEALER socket (empty delimiter, start sequence number; batches as [seq, payload] up to
// the end marker -1). It prints "ready" once connected, reads the expected batches as JSON from
// its input, collects batches 0..n-1, and checks every field of every event. Events in vLLM's
// array encoding are read by vLLM's field order.
const subscriberPy = `
import json, sys
import msgpack, zmq

pub_addr, replay_addr, topic = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.connect(pub_addr)
sub.setsockopt_string(zmq.SUBSCRIBE, topic)
replay = ctx.socket(zmq.DEALER)
replay.connect(replay_addr)
print("ready", flush=True)

want = json.load(sys.stdin)
n = len(want["batches"])
END = (-1).to_bytes(8, "big", signed=True)
got, last, replays = {}, -1, 0

def wait(sock):
    if not sock.poll(20000):
        sys.exit("no message within 20 s; have %s of %d" % (sorted(got), n))

while len(got) < n:
    wait(sub)
    t, seq_bytes, payload = sub.recv_multipart()
    assert t == topic.encode(), t
    assert len(seq_bytes) == 8, seq_bytes
    seq = int.from_bytes(seq_bytes, "big")
    if seq > last + 1:  # missed (last, seq): replay them
        replays += 1
        replay.send_multipart([b"", (last + 1).to_bytes(8, "big")])
        while True:
            wait(replay)
            delim, rseq, rpayload = replay.recv_multipart()
            assert delim == b""
            if rseq == END:
                assert rpayload == b"", rpayload
                break
            got.setdefault(int.from_bytes(rseq, "big"), rpayload)
    got.setdefault(seq, payload)
    last = max(last, seq)

FIELDS = {
    "BlockStored": (["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                     "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"], 7),
    "BlockRemoved": (["block_hashes", "medium", "group_idx"], 2),
    "AllBlocksCleared": ([], 0),
}
OPTIONAL_NULL_OMITTED = ("extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")

def as_dict(ev):
    if isinstance(ev, dict):
        assert want["encoding"] == "maps", ev
        return ev
    assert want["encoding"] == "arrays", ev
    names, required = FIELDS[ev[0]]
    assert required <= len(ev) - 1 <= len(names), ev
    d = {"type": ev[0]}
    for name, v in zip(names, ev[1:]):
        if v is None and name in OPTIONAL_NULL_OMITTED:
            continue
        d[name] = v
    return d

def hashes(v):
    if isinstance(v, list):
        return [hashes(x) for x in v]
    if want["raw"]:
        assert v is None or (isinstance(v, bytes) and len(v) == 32), v
        return v.hex() if v is not None else None
    assert v is None or (isinstance(v, int) and 0 <= v < 1 << 64), v
    return v

for seq in range(n):
    batch = msgpack.unpackb(got[seq], raw=False)
    assert isinstance(batch, list) and len(batch) == 3, batch
    ts, events, rank = batch
    assert isinstance(ts, float) and ts > 1.6e9, ts
    assert rank == want["rank"], rank
    exp = want["batches"][seq]
    assert len(events) == len(exp), (seq, events, exp)
    for i, (ev, e) in enumerate(zip(events, exp)):
        d = as_dict(ev)
        for k in ("block_hashes", "parent_block_hash"):
            if k in d:
                d[k] = hashes(d[k])
        assert set(d) == set(e), (seq, i, sorted(d), sorted(e))
        for k in e:
            assert d[k] == e[k] and type(d[k]) == type(e[k]), (seq, i, k, d[k], e[k])
print("ok", n, "batches", replays, "replays", flush=True)
`

// wantJSON is an event in vLLM's map form as the Python subscriber compares it: hashes as
// integers, or hex for raw ones.
func wantJSON(ev prefix.Event, raw bool, names map[uint64]string) map[string]any {
	hash := func(k prefix.Key) any {
		if raw {
			return hex.EncodeToString(k[:])
		}
		return Hash64(k)
	}
	hashes := make([]any, len(ev.Keys))
	for i, k := range ev.Keys {
		hashes[i] = hash(k)
	}
	orNull := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	switch ev.Kind {
	case prefix.AllBlocksCleared, prefix.EventsLost:
		return map[string]any{"type": "AllBlocksCleared"}
	case prefix.BlockRemoved:
		m := map[string]any{"type": "BlockRemoved", "block_hashes": hashes, "medium": orNull(ev.Medium)}
		if ev.HasGroup {
			m["group_idx"] = ev.Group
		}
		return m
	}
	m := map[string]any{"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": hash(ev.Parent),
		"token_ids": ev.Tokens, "block_size": ev.BlockSize, "lora_id": nil, "medium": orNull(ev.Medium), "lora_name": nil}
	if ev.ParentIsRoot {
		m["parent_block_hash"] = nil
	}
	if ev.Adapter != 0 {
		m["lora_id"] = ev.Adapter
		if n, ok := names[ev.Adapter]; ok {
			m["lora_name"] = n
		}
	}
	if ev.HasGroup {
		m["group_idx"] = ev.Group
	}
	if ev.GroupKind != "" {
		m["kv_cache_spec_kind"] = ev.GroupKind
	}
	if ev.SlidingWindow > 0 {
		m["kv_cache_spec_sliding_window"] = ev.SlidingWindow
	}
	return m
}

// pySubscriber is a Python subscriber of p, started and connected.
type pySubscriber struct {
	proc *pyclient.Proc
}

// startPython starts the Python subscriber on p and returns once p has its subscription.
func startPython(t *testing.T, p *Publisher) *pySubscriber {
	t.Helper()
	proc := pyclient.Start(t, 2*limit, subscriberPy, p.Addr(), p.ReplayAddr(), p.Topic())
	require.Equal(t, "ready", proc.Line(t))
	waitSubscribed(t, p, p.Topic())
	return &pySubscriber{proc: proc}
}

// check hands the subscriber the batches it should have read and waits for its verdict.
func (s *pySubscriber) check(t *testing.T, cfg Config, batches [][]map[string]any) string {
	t.Helper()
	enc := "maps"
	if cfg.Encoding == Arrays {
		enc = "arrays"
	}
	in, err := json.Marshal(map[string]any{"batches": batches, "rank": cfg.DataParallelRank, "encoding": enc, "raw": cfg.RawHashes})
	require.NoError(t, err)
	_, err = s.proc.In.Write(in)
	require.NoError(t, err)
	return string(s.proc.Wait(t))
}

// pyConfigs are the wire forms the Python subscriber reads.
func pyConfigs() []Config {
	var out []Config
	for i, enc := range []Encoding{Maps, Arrays} {
		for _, raw := range []bool{false, true} {
			cfg := loopback()
			cfg.Encoding, cfg.RawHashes, cfg.DataParallelRank = enc, raw, i
			cfg.LoRANames = map[uint64]string{3: "sql-lora"}
			out = append(out, cfg)
		}
	}
	return out
}

func pyName(cfg Config) string {
	return fmt.Sprintf("%v/raw=%v", cfg.Encoding, cfg.RawHashes)
}

// A Python subscriber (Debian's pyzmq and msgpack, as vLLM's example subscriber reads) checks
// every field of every event of a scripted workload on a real manager with a host prefix cache
// (stores and removals on both media, hits fetched back from the host, a namespace with a named
// adapter, cache clears), having missed the first batches and fetched them through replay.
func TestPythonSubscriberManager(t *testing.T) {
	pyclient.Require(t, "zmq", "msgpack")
	for _, cfg := range pyConfigs() {
		t.Run(pyName(cfg), func(t *testing.T) {
			dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, dev.Close()) })
			m, err := kvcache.New(dev, kvcache.Config{
				Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4,
				PageSize: 32 << 10, Capacity: 8 * (32 << 10), NoBackground: true, HostBlocks: 8, HostPrefixCache: true,
			})
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, m.Close()) })
			truth, err := m.Subscribe(1 << 12)
			require.NoError(t, err)
			sub, err := m.Subscribe(1 << 12)
			require.NoError(t, err)
			p, err := Start(sub, cfg)
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, p.Close()) })

			var batches [][]map[string]any
			seen := map[string]int{}
			step := func(what string, op func() error) {
				t.Helper()
				require.NoError(t, op(), what)
				require.NoError(t, p.Flush())
				evs := truth.Read(nil)
				if len(evs) == 0 {
					return
				}
				var batch []map[string]any
				for _, ev := range evs {
					batch = append(batch, wantJSON(ev, cfg.RawHashes, cfg.LoRANames))
					seen[fmt.Sprintf("%v/%s/root=%v/adapter=%v", ev.Kind, ev.Medium, ev.ParentIsRoot, ev.Adapter != 0)]++
				}
				batches = append(batches, batch)
			}
			tokens := func(fam, n int) []prefix.Token {
				out := make([]prefix.Token, n)
				for i := range out {
					out[i] = prefix.Token(1000*fam + i)
				}
				return out
			}
			lora := kvcache.Prompt{Tokens: tokens(1, 13), Namespace: prefix.Namespace{Adapter: 3, Salt: "tenant-a"}}

			// Before the subscriber: a named adapter's prompt in two appends, a base-model one.
			step("start a", func() error { _, err := m.StartSequence(1, lora); return err })
			step("append a", func() error { _, err := m.AppendTokenIDs(1, lora.Tokens[:9], nil); return err })
			step("append a's rest", func() error { _, err := m.AppendTokenIDs(1, lora.Tokens[9:], nil); return err })
			step("append b", func() error { _, err := m.AppendTokenIDs(2, tokens(2, 24), nil); return err })
			before := len(batches)
			require.Positive(t, before)
			py := startPython(t, p)

			// After it: write-backs to the host, evictions from the device, then from the host,
			// a hit fetched back from the host, clears.
			step("free a", func() error { return m.FreeSequence(1) })
			step("free b", func() error { return m.FreeSequence(2) })
			step("fill the device", func() error { _, err := m.AppendTokens(3, 32*4, nil); return err })
			step("free the filler", func() error { return m.FreeSequence(3) })
			step("c, a's prompt again", func() error { _, err := m.StartSequence(4, lora); return err })
			step("d, stored and written back", func() error {
				if _, err := m.AppendTokenIDs(5, tokens(5, 20), nil); err != nil {
					return err
				}
				return m.FreeSequence(5)
			})
			step("drop", func() error { _, err := m.DropCache(); return err })
			require.Greater(t, len(batches), before)
			t.Logf("events: %v", seen)
			for _, want := range []string{"BlockStored/GPU/root=true/adapter=true", "BlockStored/GPU/root=false/adapter=true",
				"BlockStored/GPU/root=true/adapter=false", "BlockStored/CPU/root=true/adapter=true",
				"BlockRemoved/GPU/root=false/adapter=false", "BlockRemoved/CPU/root=false/adapter=false",
				"AllBlocksCleared/GPU/root=false/adapter=false", "AllBlocksCleared/CPU/root=false/adapter=false"} {
				assert.Positive(t, seen[want], "the workload makes %s", want)
			}
			out := py.check(t, cfg, batches)
			assert.Equal(t, fmt.Sprintf("ok %d batches 1 replays\n", len(batches)), out)
		})
	}
}

// The same for events built by hand to reach every field, the groups of hybrid models among
// them, and a loss in the subscription.
func TestPythonSubscriberGroups(t *testing.T) {
	pyclient.Require(t, "zmq", "msgpack")
	for _, cfg := range pyConfigs() {
		t.Run(pyName(cfg), func(t *testing.T) {
			cfg.LoRANames = map[uint64]string{7: "sql-lora"}
			f, p := start(t, 16, cfg)
			events, _ := wireEvents(wireHash(false))
			var batches [][]map[string]any
			// send publishes evs and flushes; the batch holds want.
			send := func(evs []prefix.Event, want ...prefix.Event) {
				f.Publish(evs...)
				require.NoError(t, p.Flush())
				var batch []map[string]any
				for _, ev := range want {
					if ev.Kind != 0 {
						batch = append(batch, wantJSON(ev, cfg.RawHashes, cfg.LoRANames))
					}
				}
				batches = append(batches, batch)
			}
			send(events, events...)
			py := startPython(t, p)
			send(events[1:3], events[1:3]...)
			f.Publish(events...) // 8 + 8 + 1 events: the queue of 16 overflows
			f.Publish(events...)
			send(events[:1], prefix.Event{Kind: prefix.EventsLost})
			send(events[5:], events[5:]...)
			out := py.check(t, cfg, batches)
			assert.Equal(t, fmt.Sprintf("ok %d batches 1 replays\n", len(batches)), out)
			assert.Equal(t, uint64(17), p.Stats().Lost)
		})
	}
}
