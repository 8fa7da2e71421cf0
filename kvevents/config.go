package kvevents

import (
	"fmt"
	"maps"
	"net"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Defaults, as vLLM's ZmqEventPublisher has them where it has one.
const (
	DefaultReplayBuffer = 10000            // batches kept for replay
	DefaultReplayBytes  = 64 << 20         // bytes of batches kept for replay (vLLM has no such bound)
	DefaultHWM          = 100000           // batches the PUB socket queues
	DefaultInterval     = time.Millisecond // the period of EveryInterval batching
)

// Batching says when the events waiting in the subscription go out as one batch.
type Batching uint8

const (
	// EveryInterval sends what waits Interval (1 ms by default) after the first event of a
	// batch: the appending goroutines wake the publisher at most once a batch.
	EveryInterval Batching = iota
	// EveryCall sends as soon as a manager call's events wait (the events of several calls
	// when the publisher is behind): the lowest latency, for the price of waking the publisher's
	// goroutine from the appending one on every call that caches or evicts.
	EveryCall
	// EveryFlush sends only when Flush is called: one batch per engine step, as vLLM's
	// scheduler publishes, for a runtime that calls Flush at the end of each step.
	EveryFlush
)

// String names the batching.
func (b Batching) String() string {
	switch b {
	case EveryInterval:
		return "EveryInterval"
	case EveryCall:
		return "EveryCall"
	case EveryFlush:
		return "EveryFlush"
	}
	return fmt.Sprintf("Batching(%d)", uint8(b))
}

// Encoding is how events are laid out in a batch.
type Encoding uint8

const (
	// Maps encodes each event as a map tagged "type" ({"type": "BlockStored", "block_hashes":
	// ...}), as vLLM has since mid-2026. Current decoders (llm-d, Dynamo, kthena) read both.
	Maps Encoding = iota
	// Arrays encodes each event as an array with the tag first (["BlockStored", hashes, ...]),
	// vLLM's older positional form, for decoders that read only that (vLLM's example
	// subscriber of that time, older llm-d).
	Arrays
)

// String names the encoding.
func (e Encoding) String() string {
	switch e {
	case Maps:
		return "Maps"
	case Arrays:
		return "Arrays"
	}
	return fmt.Sprintf("Encoding(%d)", uint8(e))
}

// Config says where and how a Publisher sends. It is pure data; Start binds it.
type Config struct {
	// Endpoint is the address of the PUB socket, as vLLM's kv-events endpoint: the publisher
	// binds when it holds "*" or "::" or is ipc://, and connects otherwise (tcp://*:5557 binds
	// every interface, tcp://127.0.0.1:* an ephemeral loopback port, tcp://router:5557 connects
	// to a subscriber that binds). inproc:// is refused: go-zeromq's in-process pipe cannot
	// carry a frame longer than its reader's buffer. Required.
	Endpoint string
	// ReplayEndpoint, if set, is bound by a ROUTER socket that serves replay requests: a start
	// sequence number in, every buffered batch from it out, then the end marker.
	ReplayEndpoint string
	// ReplayBuffer and ReplayBytes bound what replay keeps: the newest ReplayBuffer batches
	// (0: DefaultReplayBuffer, as vLLM) of at most ReplayBytes in all (0: DefaultReplayBytes; the
	// newest batch is kept whatever its size). Batches of a millisecond of busy decoding weigh
	// tens of kilobytes, so the byte bound is the one that holds then.
	ReplayBuffer int
	ReplayBytes  int
	// Pod and Model make the topic "kv@<pod>@<model>" that llm-d's indexer parses: each
	// non-empty, valid UTF-8, without '@'.
	Pod, Model string
	// DataParallelRank is sent with every batch and offsets both endpoints' tcp ports by the
	// rank, as vLLM does for data parallelism. An ephemeral port ("*" or 0) stays one; an ipc
	// endpoint takes no rank.
	DataParallelRank int
	// Batching says when events go out; Interval is EveryInterval's period (0: DefaultInterval).
	Batching Batching
	Interval time.Duration
	// Encoding lays out the events (Maps by default).
	Encoding Encoding
	// RawHashes sends each block hash as its 32 bytes (a msgpack bin) instead of vLLM's default,
	// the low 64 bits of the digest as an integer (Hash64).
	RawHashes bool
	// LoRANames gives the lora_name sent with an adapter's blocks (vLLM keys blocks by it); an
	// adapter without a name goes out with lora_name null. A name is not empty, and adapter 0
	// (the base model) has none. Start copies the map.
	LoRANames map[uint64]string
	// HWM bounds the batches the PUB socket queues for its subscribers (0: DefaultHWM); beyond
	// it batches are dropped, and a subscriber that sees a gap in the sequence numbers fetches
	// them through replay.
	HWM int
	// OnError, if set, is called on the publisher's goroutines with every error met while
	// running: a malformed replay request (*RequestError), a failed send. It must not block,
	// nor call the publisher's Close or Flush, which wait for the goroutine it runs on. Errors
	// are counted in Stats either way.
	OnError func(error)
}

// ConfigError reports a Config field that cannot be used; it matches ErrInvalidArgument.
type ConfigError struct {
	Field  string
	Value  any
	Reason string
}

// Error describes the failure.
func (e *ConfigError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: config: %s = %#v: %s", e.Field, e.Value, e.Reason)
}

// Is reports whether target is ErrInvalidArgument.
func (e *ConfigError) Is(target error) bool { return e != nil && target == errdefs.ErrInvalidArgument }

// Validate checks the fields that need no socket; the error is a *ConfigError.
func (c Config) Validate() error {
	if _, err := Topic(c.Pod, c.Model); err != nil {
		return err
	}
	for _, f := range []struct {
		name   string
		v, max int
	}{{"ReplayBuffer", c.ReplayBuffer, 1 << 30}, {"ReplayBytes", c.ReplayBytes, 1 << 40}, {"HWM", c.HWM, 1 << 30},
		{"DataParallelRank", c.DataParallelRank, 1 << 30}} {
		if f.v < 0 || f.v > f.max {
			return &ConfigError{Field: f.name, Value: f.v, Reason: fmt.Sprintf("must lie in [0, %d]", f.max)}
		}
	}
	if c.Interval < 0 || c.Interval > time.Hour {
		return &ConfigError{Field: "Interval", Value: c.Interval, Reason: "must lie in [0, 1h]"}
	}
	if c.Batching > EveryFlush {
		return &ConfigError{Field: "Batching", Value: c.Batching, Reason: "unknown"}
	}
	if c.Encoding > Arrays {
		return &ConfigError{Field: "Encoding", Value: c.Encoding, Reason: "unknown"}
	}
	for id, name := range c.LoRANames { // as kvcache's KeyScheme.LoRANames
		switch {
		case id == 0:
			return &ConfigError{Field: "LoRANames", Value: name, Reason: "adapter 0 is the base model: its blocks go out with lora_name null"}
		case name == "":
			return &ConfigError{Field: "LoRANames", Value: id, Reason: "an adapter's LoRA name must not be empty (vLLM would key its blocks apart from the base model's)"}
		}
	}
	if _, _, err := endpoint("Endpoint", c.Endpoint, c.DataParallelRank, false); err != nil {
		return err
	}
	if c.ReplayEndpoint != "" {
		if _, _, err := endpoint("ReplayEndpoint", c.ReplayEndpoint, c.DataParallelRank, true); err != nil {
			return err
		}
	}
	return nil
}

// withDefaults returns c with its zero fields defaulted and its map copied.
func (c Config) withDefaults() Config {
	if c.ReplayBuffer == 0 {
		c.ReplayBuffer = DefaultReplayBuffer
	}
	if c.ReplayBytes == 0 {
		c.ReplayBytes = DefaultReplayBytes
	}
	if c.HWM == 0 {
		c.HWM = DefaultHWM
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	c.LoRANames = maps.Clone(c.LoRANames)
	return c
}

// Topic returns the topic "kv@<pod>@<model>" under which llm-d's indexer finds a replica's
// events. Each part must be non-empty, valid UTF-8 and free of '@' (the indexer splits the topic
// at '@'); otherwise the error is a *ConfigError.
func Topic(pod, model string) (string, error) {
	for _, p := range []struct{ name, v string }{{"Pod", pod}, {"Model", model}} {
		switch {
		case p.v == "":
			return "", &ConfigError{Field: p.name, Value: p.v, Reason: "required"}
		case strings.Contains(p.v, "@"):
			return "", &ConfigError{Field: p.name, Value: p.v, Reason: "'@' separates the topic's parts"}
		case !utf8.ValidString(p.v):
			return "", &ConfigError{Field: p.name, Value: p.v, Reason: "not UTF-8"}
		}
	}
	return "kv@" + pod + "@" + model, nil
}

// endpoint returns the address to use for ep (offset for the data-parallel rank) and whether
// to bind it (vLLM's rule, or always for a replay endpoint), or a *ConfigError naming field.
func endpoint(field, ep string, rank int, always bool) (addr string, bind bool, _ error) {
	bad := func(reason string) error { return &ConfigError{Field: field, Value: ep, Reason: reason} }
	scheme, rest, ok := strings.Cut(ep, "://")
	switch {
	case ep == "":
		return "", false, bad("required")
	case !ok || rest == "":
		return "", false, bad("want tcp://host:port, ipc://path or inproc://name")
	}
	switch scheme {
	case "inproc":
		// go-zeromq's inproc pipe drops the rest of a chunk that a reader reads in parts, which
		// every frame longer than its header is.
		return "", false, bad("inproc is not supported; use ipc:// or tcp://127.0.0.1:*")
	case "ipc":
		if rank > 0 {
			return "", false, bad("a data-parallel rank offsets tcp ports and inproc names only, as in vLLM")
		}
		return ep, true, nil
	case "tcp":
	default:
		return "", false, bad("unknown transport " + strconv.Quote(scheme))
	}
	host, port, err := net.SplitHostPort(rest)
	if err != nil {
		return "", false, bad(err.Error())
	}
	bind = always || strings.Contains(ep, "*") || strings.Contains(ep, "::")
	if port == "*" { // an ephemeral port binds, whatever the rank
		return ep, true, nil
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p+rank > 65535 || (p == 0 && !bind) {
		return "", false, bad("port must lie in [0, 65535], 0 only to bind")
	}
	if host == "" && !bind {
		return "", false, bad("a connect endpoint names its host")
	}
	if p == 0 { // ephemeral, whatever the rank
		rank = 0
	}
	return "tcp://" + net.JoinHostPort(host, strconv.Itoa(p+rank)), bind, nil
}
