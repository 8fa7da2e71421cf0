package kvevents

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"

	"github.com/go-zeromq/zmq4"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
)

// stored returns a one-block BlockStored event whose token is i.
func stored(i int) prefix.Event {
	tokens := []prefix.Token{prefix.Token(i)}
	return prefix.Event{Kind: prefix.BlockStored, Keys: prefix.Keys(nil, prefix.Namespace{}, 1, tokens),
		Tokens: tokens, BlockSize: 1, ParentIsRoot: true, Medium: prefix.MediumGPU}
}

// firstToken returns the token of the first event of a batch (maps encoding).
func firstToken(t *testing.T, payload []byte) int64 {
	t.Helper()
	ev := decode(t, payload).([]any)[1].([]any)[0].(map[string]any)
	return ev["token_ids"].([]any)[0].(int64)
}

// A subscriber that joins late sees a gap in the sequence numbers and fetches the missed batches
// through replay, in order, then the end marker; replay keeps only the newest ReplayBuffer
// batches, and a start past the newest gets the end marker alone.
func TestReplayRecoversMissedBatches(t *testing.T) {
	cfg := loopback()
	cfg.ReplayBuffer = 6
	f, p := start(t, 64, cfg)
	for i := range 5 { // sent before anyone subscribes: lost to a subscriber
		f.Publish(stored(i))
		require.NoError(t, p.Flush())
	}
	s := subscribe(t, p, "kv@pod-1@")
	for i := 5; i < 8; i++ {
		f.Publish(stored(i))
		require.NoError(t, p.Flush())
	}
	seq, payload := s.recv(t, "kv@pod-1@llama")
	// Which batch a new subscriber sees first depends on when its subscription reaches the
	// publisher (ZMQ's slow joiner); what it missed, replay gives back.
	require.LessOrEqual(t, seq, uint64(7), "a batch the subscriber sees")
	assert.Equal(t, int64(seq), firstToken(t, payload))

	seqs, payloads := replay(t, p, 0) // batches 0 and 1 have left the buffer of 6
	require.Equal(t, []uint64{2, 3, 4, 5, 6, 7}, seqs)
	for i, pl := range payloads {
		assert.Equal(t, int64(seqs[i]), firstToken(t, pl))
	}
	seqs, _ = replay(t, p, 4)
	assert.Equal(t, []uint64{4, 5, 6, 7}, seqs)
	seqs, _ = replay(t, p, 8)
	assert.Empty(t, seqs)
	seqs, _ = replay(t, p, 1<<63)
	assert.Empty(t, seqs)
	for want := seq + 1; want <= 7; want++ { // the stream goes on, in order, from the first batch seen
		seq, _ = s.recv(t, "kv@pod-1@llama")
		assert.Equal(t, want, seq)
	}
	st := p.Stats()
	assert.Equal(t, uint64(4), st.Replays)
	assert.Equal(t, 6, st.Buffered)
	assert.Equal(t, uint64(8), st.Batches)
}

// Malformed replay requests and peers that send garbage get typed errors (or are cut off) and
// no answer, and the publisher goes on serving both the stream and replay.
func TestReplayBadInput(t *testing.T) {
	cfg := loopback()
	errs := make(chan error, 64)
	cfg.OnError = func(err error) { errs <- err }
	f, p := start(t, 64, cfg)
	f.Publish(stored(0))
	require.NoError(t, p.Flush())
	addr := strings.TrimPrefix(p.ReplayAddr(), "tcp://")

	// A ZMQ peer sending requests of the wrong shape, from a DEALER (frames as sent).
	d := zmq4.NewDealer(context.Background(), zmq4.WithLogger(quiet))
	defer d.Close()
	require.NoError(t, d.Dial(p.ReplayAddr()))
	start8 := binary.BigEndian.AppendUint64(nil, 0)
	bad := []zmq4.Msg{
		zmq4.NewMsgFrom(start8),                                     // no delimiter
		zmq4.NewMsgFrom([]byte{}, start8[:7]),                       // a short start
		zmq4.NewMsgFrom([]byte{}, append(start8, 0)),                // a long start
		zmq4.NewMsgFrom([]byte("x"), start8),                        // a delimiter that is not empty
		zmq4.NewMsgFrom([]byte{}, start8, []byte("more")),           // a frame too many
		zmq4.NewMsgFrom([]byte{}, []byte{}),                         // an empty start
		zmq4.NewMsgFrom([]byte("garbage \x00\xff garbage garbage")), // one frame of noise
	}
	for _, m := range bad {
		require.NoError(t, d.Send(m))
	}
	for range bad {
		var re *RequestError
		err := <-errs
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrInvalidArgument)
		assert.Contains(t, err.Error(), "kvevents: replay: ")
	}
	assert.Equal(t, uint64(len(bad)), p.Stats().BadRequests)

	// Peers that do not speak ZMTP, or speak it wrong: noise; a greeting, then a frame header
	// declaring 2^62 bytes (go-zeromq alone would allocate it); a greeting, then a READY whose
	// property lengths point past its end (go-zeromq alone would index past it).
	greeting := make([]byte, 64)
	greeting[0], greeting[9], greeting[10], greeting[11] = 0xff, 0x7f, 3, 0
	copy(greeting[12:], "NULL")
	ready := append([]byte{0x04, 14, 5}, "READY"...)
	ready = append(ready, 11, 'S', 'o', 'c', 'k', 'e', 't', '-', 'T', 'y', 'p', 'e') // no value length
	huge := []byte{0x06, 0x40, 0, 0, 0, 0, 0, 0, 0}
	for _, garbage := range [][]byte{
		[]byte(strings.Repeat("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 4)),
		append(append([]byte(nil), greeting...), huge...),
		append(append([]byte(nil), greeting...), ready...),
	} {
		for _, a := range []string{addr, strings.TrimPrefix(p.Addr(), "tcp://")} {
			c, err := net.Dial("tcp", a)
			require.NoError(t, err)
			_, err = c.Write(garbage)
			require.NoError(t, err)
			_, _ = c.Read(make([]byte, 256)) // the greeting, if any, then the end
			c.Close()
		}
	}

	requireServing(t, f, p)
}

// Bad configurations are *ConfigErrors from Start, which leaves the subscription the caller's;
// an endpoint that cannot be bound is an *EndpointError at Start, not later.
func TestStartBadConfig(t *testing.T) {
	var f prefix.Feed
	sub, err := f.Subscribe(4)
	require.NoError(t, err)
	edit := func(fn func(*Config)) Config {
		c := loopback()
		fn(&c)
		return c
	}
	for name, cfg := range map[string]Config{
		"empty endpoint":         edit(func(c *Config) { c.Endpoint = "" }),
		"no transport":           edit(func(c *Config) { c.Endpoint = "127.0.0.1:5557" }),
		"unknown transport":      edit(func(c *Config) { c.Endpoint = "udp://127.0.0.1:*" }),
		"inproc":                 edit(func(c *Config) { c.Endpoint = "inproc://events" }),
		"no port":                edit(func(c *Config) { c.Endpoint = "tcp://127.0.0.1" }),
		"port out of range":      edit(func(c *Config) { c.Endpoint = "tcp://*:70000" }),
		"port past 65535 by dp":  edit(func(c *Config) { c.Endpoint, c.DataParallelRank = "tcp://*:65535", 1 }),
		"connect to port 0":      edit(func(c *Config) { c.Endpoint = "tcp://127.0.0.1:0" }),
		"ipc with a rank":        edit(func(c *Config) { c.Endpoint, c.DataParallelRank = "ipc:///tmp/x", 1 }),
		"bad replay endpoint":    edit(func(c *Config) { c.ReplayEndpoint = "tcp://" }),
		"@ in the pod":           edit(func(c *Config) { c.Pod = "pod@1" }),
		"@ in the model":         edit(func(c *Config) { c.Model = "meta@llama" }),
		"empty model":            edit(func(c *Config) { c.Model = "" }),
		"pod not UTF-8":          edit(func(c *Config) { c.Pod = "\xff" }),
		"negative replay buffer": edit(func(c *Config) { c.ReplayBuffer = -1 }),
		"huge HWM":               edit(func(c *Config) { c.HWM = 1 << 40 }),
		"negative rank":          edit(func(c *Config) { c.DataParallelRank = -1 }),
		"negative interval":      edit(func(c *Config) { c.Interval = -1 }),
		"unknown batching":       edit(func(c *Config) { c.Batching = 9 }),
		"unknown encoding":       edit(func(c *Config) { c.Encoding = 9 }),
		"a name for adapter 0":   edit(func(c *Config) { c.LoRANames = map[uint64]string{0: "base"} }),
		"an empty LoRA name":     edit(func(c *Config) { c.LoRANames = map[uint64]string{1: "sql", 3: ""} }),
	} {
		_, err := Start(sub, cfg)
		var ce *ConfigError
		require.ErrorAs(t, err, &ce, name)
		assert.ErrorIs(t, err, ErrInvalidArgument, name)
		assert.True(t, strings.HasPrefix(err.Error(), "kvevents: start: invalid argument: config: "), err.Error())
	}
	_, err = Start(nil, loopback())
	assert.ErrorIs(t, err, ErrInvalidArgument)

	// An address in use, for the stream (a unix socket) and for replay (a loopback port).
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	path := t.TempDir() + "/kv.sock"
	u, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer u.Close()
	for _, cfg := range []Config{
		edit(func(c *Config) { c.Endpoint = "ipc://" + path }),
		edit(func(c *Config) { c.ReplayEndpoint = "tcp://" + l.Addr().String() }),
	} {
		_, err := Start(sub, cfg)
		var ee *EndpointError
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, "bind", ee.Op)
		assert.ErrorIs(t, err, ErrInvalidArgument)
		assert.True(t, errors.Is(err, syscall.EADDRINUSE), err.Error())
	}

	f.Publish(stored(0)) // the subscription is still the caller's, and open
	assert.Len(t, sub.Read(nil), 1)
	require.NoError(t, sub.Close())
}

// Topic joins the parts as llm-d parses them and refuses a part it could not split back.
func TestTopic(t *testing.T) {
	topic, err := Topic("vllm-0", "meta-llama/Llama-3.1-8B")
	require.NoError(t, err)
	assert.Equal(t, "kv@vllm-0@meta-llama/Llama-3.1-8B", topic)
	for _, parts := range [][2]string{{"a@b", "m"}, {"p", "m@"}, {"", "m"}, {"p", ""}} {
		_, err := Topic(parts[0], parts[1])
		assert.ErrorIs(t, err, ErrInvalidArgument, parts)
	}
}

// vLLM's endpoint rules: bind on "*", "::" or ipc, connect otherwise, and the replay endpoint
// always binds; data-parallel ranks offset tcp ports.
func TestEndpointRules(t *testing.T) {
	for _, c := range []struct {
		ep   string
		rank int
		addr string
		bind bool
	}{
		{"tcp://*:5557", 0, "tcp://*:5557", true},
		{"tcp://*:5557", 2, "tcp://*:5559", true},
		{"tcp://[::]:5557", 1, "tcp://[::]:5558", true},
		{"tcp://127.0.0.1:*", 3, "tcp://127.0.0.1:*", true},
		{"tcp://router.example:5557", 0, "tcp://router.example:5557", false},
		{"tcp://10.0.0.1:5557", 4, "tcp://10.0.0.1:5561", false},
		{"ipc:///run/kv.sock", 0, "ipc:///run/kv.sock", true},
	} {
		addr, bind, err := endpoint("Endpoint", c.ep, c.rank, false)
		require.NoError(t, err, c.ep)
		assert.Equal(t, c.addr, addr, c.ep)
		assert.Equal(t, c.bind, bind, c.ep)
	}
	addr, bind, err := endpoint("ReplayEndpoint", "tcp://127.0.0.1:0", 1, true) // replay always binds
	require.NoError(t, err)
	assert.Equal(t, "tcp://127.0.0.1:0", addr, "an ephemeral port stays one")
	assert.True(t, bind)
}

// A connect endpoint reaches a subscriber that binds, as vLLM's publisher connects to a router
// that listens; the dialler keeps trying until the subscriber is there.
func TestConnectEndpoint(t *testing.T) {
	s := zmq4.NewSub(context.Background(), zmq4.WithLogger(quiet))
	defer s.Close()
	require.NoError(t, s.Listen("tcp://127.0.0.1:0"))
	require.NoError(t, s.SetOption(zmq4.OptionSubscribe, "kv@"))
	cfg := loopback()
	cfg.Endpoint, cfg.ReplayEndpoint = "tcp://"+s.Addr().String(), ""
	f, p := start(t, 8, cfg)
	assert.Equal(t, cfg.Endpoint, p.Addr())
	assert.Empty(t, p.ReplayAddr())
	waitSubscribed(t, p, "kv@")
	f.Publish(stored(3))
	require.NoError(t, p.Flush())
	m := recvTimeout(t, s)
	require.Len(t, m.Frames, 3)
	assert.Equal(t, int64(3), firstToken(t, m.Frames[2]))
}

// Batches go out without Flush under EveryCall and EveryInterval; Flush still closes one.
func TestBatchingSends(t *testing.T) {
	for _, b := range []Batching{EveryCall, EveryInterval} {
		t.Run(b.String(), func(t *testing.T) {
			cfg := loopback()
			cfg.Batching = b
			f, p := start(t, 64, cfg)
			s := subscribe(t, p, "kv@")
			for i := range 3 {
				f.Publish(stored(i))
			}
			got, batches := 0, uint64(0)
			for got < 3 { // one batch or several, in order
				seq, payload := s.recv(t, "kv@pod-1@llama")
				assert.Equal(t, batches, seq)
				batches++
				events := decode(t, payload).([]any)[1].([]any)
				for _, ev := range events {
					assert.Equal(t, int64(got), ev.(map[string]any)["token_ids"].([]any)[0])
					got++
				}
			}
			require.NoError(t, p.Flush())
		})
	}
}

// Close sends what waits, closes the subscription, and refuses a second Close and a Flush;
// a publisher whose manager closed the subscription first still serves replay until Close.
func TestCloseLifecycle(t *testing.T) {
	var f prefix.Feed
	sub, err := f.Subscribe(8)
	require.NoError(t, err)
	p, err := Start(sub, loopback())
	require.NoError(t, err)
	f.Publish(stored(0))
	f.Close() // the manager goes away first
	seqs, _ := replay(t, p, 0)
	assert.Empty(t, seqs, "nothing sent yet under EveryFlush")
	require.NoError(t, p.Flush())
	seqs, _ = replay(t, p, 0)
	assert.Equal(t, []uint64{0}, seqs)
	require.NoError(t, p.Close())
	assert.ErrorIs(t, p.Close(), ErrClosed)
	assert.ErrorIs(t, p.Flush(), ErrClosed)
	assert.ErrorIs(t, sub.Close(), ErrClosed, "Close closed the subscription")
	assert.Equal(t, uint64(1), p.Stats().Batches)

	var zero Publisher
	assert.ErrorIs(t, zero.Close(), ErrInvalidArgument)
	assert.ErrorIs(t, (*Publisher)(nil).Flush(), ErrInvalidArgument)
	assert.Empty(t, (*Publisher)(nil).Addr())
}

// A peer that connects and says nothing holds up the handshakes of later peers only until it is
// cut off (go-zeromq shakes hands with one peer at a time, with no deadline of its own).
func TestSilentPeer(t *testing.T) {
	f, p := start(t, 8, loopback())
	f.Publish(stored(0))
	require.NoError(t, p.Flush())
	silent, err := net.Dial("tcp", strings.TrimPrefix(p.ReplayAddr(), "tcp://"))
	require.NoError(t, err)
	defer silent.Close()
	seqs, _ := replay(t, p, 0) // served once the silent peer is cut off
	assert.Equal(t, []uint64{0}, seqs)
	n, err := silent.Read(make([]byte, 128))
	for err == nil { // the greeting, then the end
		var m int
		m, err = silent.Read(make([]byte, 128))
		n += m
	}
	assert.Equal(t, 64, n, "the publisher's greeting, then nothing")
}

// Replay keeps at most ReplayBuffer batches of at most ReplayBytes in all, the newest one
// whatever its size, and answers from what it keeps.
func TestReplayBounds(t *testing.T) {
	r := ring{max: 4, maxBytes: 25}
	seqs := func(start uint64) (out []uint64) {
		for _, e := range r.from(start, nil) {
			out = append(out, e.seq)
		}
		return out
	}
	for i := range uint64(6) {
		r.add(i, make([]byte, 10))
	}
	assert.Equal(t, []uint64{4, 5}, seqs(0), "25 bytes keep two batches of 10")
	r.add(6, make([]byte, 100))
	assert.Equal(t, []uint64{6}, seqs(0), "the newest batch stays whatever its size")
	r.maxBytes = 1 << 20
	for i := uint64(7); i < 1000; i++ {
		r.add(i, make([]byte, 1))
	}
	assert.Equal(t, []uint64{996, 997, 998, 999}, seqs(0))
	assert.Equal(t, []uint64{998, 999}, seqs(998))
	assert.Empty(t, seqs(1000))
	assert.Equal(t, 4, r.len())
	assert.LessOrEqual(t, cap(r.buf), 64, "the kept entries move down instead of the slice growing")

	cfg := loopback()
	cfg.ReplayBytes = 1
	f, p := start(t, 8, cfg)
	for i := range 3 {
		f.Publish(stored(i))
		require.NoError(t, p.Flush())
	}
	got, _ := replay(t, p, 0)
	assert.Equal(t, []uint64{2}, got)
}

// A peer whose handshake the publisher began before Close and that finishes it after is cut
// off, not kept: Close leaves no connection open on either socket (go-zeromq adds a connection
// whose handshake ends after its socket closed, and never closes it).
func TestCloseCutsHandshakingPeer(t *testing.T) {
	for _, c := range []struct{ socket, peer string }{{"stream", "SUB"}, {"replay", "DEALER"}} {
		t.Run(c.socket, func(t *testing.T) {
			var f prefix.Feed
			sub, err := f.Subscribe(4)
			require.NoError(t, err)
			p, err := Start(sub, loopback())
			require.NoError(t, err)
			addr := map[string]string{"stream": p.Addr(), "replay": p.ReplayAddr()}[c.socket]
			conn, err := net.Dial("tcp", strings.TrimPrefix(addr, "tcp://"))
			require.NoError(t, err)
			defer conn.Close()
			_, err = io.ReadFull(conn, make([]byte, 64)) // the publisher's greeting: its handshake has begun
			require.NoError(t, err)
			require.NoError(t, p.Close())

			_, _ = conn.Write(append(zmtpGreeting(), zmtpReady("Socket-Type", c.peer)...)) // fails once cut off
			requireCutOff(t, conn, "a peer that finished its handshake after Close")
		})
	}
}

// A peer that declares a socket type its socket does not take (one go-zeromq does not know,
// none, or one that cannot talk to it) is cut off at its READY, and the publisher serves on:
// go-zeromq alone panics on a type it does not know, and keeps the connection of one it
// refuses open for good.
func TestPeerSocketType(t *testing.T) {
	f, p := start(t, 8, loopback())
	f.Publish(stored(0))
	require.NoError(t, p.Flush())
	for _, c := range []struct {
		socket string
		props  []string
	}{
		{"stream", []string{"Socket-Type", "STREAM"}},
		{"stream", []string{"Socket-Type", "sub"}},
		{"stream", []string{"socket-type", "CLIENT"}},
		{"stream", []string{"Socket-Type", "SUB", "socket-type", "RADIO"}}, // the last one counts
		{"stream", []string{"SOCKET-TYPE", "SUB"}},                         // go-zeromq reads Socket-Type, title-cased
		{"stream", []string{"Identity", "x"}},
		{"stream", nil},
		{"stream", []string{"Socket-Type", "PUB"}},
		{"stream", []string{"Socket-Type", "DEALER"}},
		{"replay", []string{"Socket-Type", "STREAM"}},
		{"replay", nil},
		{"replay", []string{"Socket-Type", "SUB"}},
		{"replay", []string{"Socket-Type", "PUB"}},
	} {
		addr := map[string]string{"stream": p.Addr(), "replay": p.ReplayAddr()}[c.socket]
		conn, err := net.Dial("tcp", strings.TrimPrefix(addr, "tcp://"))
		require.NoError(t, err)
		_, _ = conn.Write(append(zmtpGreeting(), zmtpReady(c.props...)...)) // fails once cut off
		requireCutOff(t, conn, fmt.Sprintf("a peer of the %s socket with properties %q", c.socket, c.props))
		conn.Close()
	}
	requireServing(t, f, p)
}

// A subscriber that sends the PUB socket a message that is not a subscription is cut off, a
// command after its READY (a ZMTP 3.1 PING, as libzmq sends to keep a connection alive) is
// dropped, and the subscribers are served on: go-zeromq's PUB socket queues either for a Recv it
// never serves, and once ten wait, blocks the reader of the connection that sends one more for
// good, keeping it open and deaf to its subscriptions.
func TestPubPeerSendsNoSubscription(t *testing.T) {
	f, p := start(t, 8, loopback())
	conn, err := net.Dial("tcp", strings.TrimPrefix(p.Addr(), "tcp://"))
	require.NoError(t, err)
	defer conn.Close()
	hello := append(zmtpGreeting(), zmtpReady("Socket-Type", "SUB")...)
	ping := append([]byte{0x04, 7, 4}, "PING\x00\x00"...)
	for range 11 { // one more than go-zeromq queues
		hello = append(hello, ping...)
	}
	_, err = conn.Write(append(hello, 0x00, 4, 0x01, 'k', 'v', '@'))
	require.NoError(t, err)
	waitSubscribed(t, p, "kv@") // the subscription behind the pings is read

	for i, msg := range [][]byte{
		{0x01, 2, 0x01, 'a', 0x00, 1, 'b'}, // a subscription with a second frame
		{0x00, 0},                          // an empty frame
		{0x00, 3, 0x02, 'k', 'v'},          // neither a subscription nor its cancel
		{0x00, 3, 'k', 'v', '@'},
	} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(p.Addr(), "tcp://"))
		require.NoError(t, err)
		topic := fmt.Sprintf("kv@%d", i)
		hello := append(zmtpGreeting(), zmtpReady("Socket-Type", "SUB")...)
		_, err = conn.Write(append(append(hello, 0x00, byte(1+len(topic)), 0x01), topic...))
		require.NoError(t, err)
		waitSubscribed(t, p, topic) // a subscription passes
		_, err = conn.Write(msg)
		require.NoError(t, err)
		requireCutOff(t, conn, fmt.Sprintf("a subscriber that sent message %d", i))
		conn.Close()
	}
	s := subscribe(t, p, "kv@pod-1") // a topic of its own: the first peer holds "kv@"
	f.Publish(stored(0))
	require.NoError(t, p.Flush())
	seq, _ := s.recv(t, "kv@pod-1@llama")
	assert.Equal(t, uint64(0), seq)
}
