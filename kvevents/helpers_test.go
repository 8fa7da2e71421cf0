package kvevents

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/go-zeromq/zmq4"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/pagedkv/pagedkv/prefix"
)

// limit bounds every wait of the tests: a test that reaches it fails.
const limit = 20 * time.Second

// start starts a publisher of a fresh feed's subscription (queue events) with cfg, closed when
// the test ends.
func start(t *testing.T, queue int, cfg Config) (*prefix.Feed, *Publisher) {
	t.Helper()
	f := &prefix.Feed{}
	sub, err := f.Subscribe(queue)
	require.NoError(t, err)
	p, err := Start(sub, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	return f, p
}

// loopback is a Config on ephemeral loopback ports, batches sent on Flush.
func loopback() Config {
	return Config{
		Endpoint: "tcp://127.0.0.1:*", ReplayEndpoint: "tcp://127.0.0.1:*",
		Pod: "pod-1", Model: "llama", Batching: EveryFlush,
	}
}

// subscriber is a SUB socket of this package's tests, a second, independent ZMQ client beside
// the Python one.
type subscriber struct {
	s zmq4.Socket
}

// subscribe connects a SUB socket to p, subscribed to topic, and returns once p's PUB socket
// has the subscription (so that nothing sent after that is missed).
func subscribe(t testing.TB, p *Publisher, topic string) *subscriber {
	t.Helper()
	s := zmq4.NewSub(context.Background(), zmq4.WithLogger(quiet))
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Dial(p.Addr()))
	require.NoError(t, s.SetOption(zmq4.OptionSubscribe, topic))
	waitSubscribed(t, p, topic)
	return &subscriber{s: s}
}

// waitSubscribed waits until p's PUB socket has a subscriber to topic.
func waitSubscribed(t testing.TB, p *Publisher, topic string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !slices.Contains(p.pub.(zmq4.Topics).Topics(), topic) {
		require.True(t, time.Now().Before(deadline), "no subscription to %q reached the publisher", topic)
		time.Sleep(time.Millisecond)
	}
}

// recv returns the next message's sequence number and payload, checking its topic.
func (s *subscriber) recv(t *testing.T, topic string) (uint64, []byte) {
	t.Helper()
	type result struct {
		msg zmq4.Msg
		err error
	}
	c := make(chan result, 1)
	go func() {
		m, err := s.s.Recv()
		c <- result{m, err}
	}()
	select {
	case r := <-c:
		require.NoError(t, r.err)
		require.Len(t, r.msg.Frames, 3, "topic, sequence number, payload")
		require.Equal(t, topic, string(r.msg.Frames[0]))
		require.Len(t, r.msg.Frames[1], 8)
		return binary.BigEndian.Uint64(r.msg.Frames[1]), r.msg.Frames[2]
	case <-time.After(limit):
		t.Fatal("no message")
	}
	return 0, nil
}

// replay asks p's replay socket for the batches from start on, from a DEALER socket, and
// returns them by sequence number, checking the end marker.
func replay(t *testing.T, p *Publisher, start uint64) ([]uint64, [][]byte) {
	t.Helper()
	d := zmq4.NewDealer(context.Background(), zmq4.WithLogger(quiet))
	defer d.Close()
	require.NoError(t, d.Dial(p.ReplayAddr()))
	req := binary.BigEndian.AppendUint64(nil, start)
	require.NoError(t, d.Send(zmq4.NewMsgFrom([]byte{}, req)))
	var seqs []uint64
	var payloads [][]byte
	for {
		m := recvTimeout(t, d)
		require.Len(t, m.Frames, 3, "delimiter, sequence number, payload")
		require.Empty(t, m.Frames[0])
		if bytes.Equal(m.Frames[1], endMarker) {
			require.Empty(t, m.Frames[2], "the end marker has an empty payload")
			return seqs, payloads
		}
		seqs = append(seqs, binary.BigEndian.Uint64(m.Frames[1]))
		payloads = append(payloads, m.Frames[2])
	}
}

func recvTimeout(t *testing.T, s zmq4.Socket) zmq4.Msg {
	t.Helper()
	type result struct {
		msg zmq4.Msg
		err error
	}
	c := make(chan result, 1)
	go func() {
		m, err := s.Recv()
		c <- result{m, err}
	}()
	select {
	case r := <-c:
		require.NoError(t, r.err)
		return r.msg
	case <-time.After(limit):
		t.Fatal("no answer")
	}
	return zmq4.Msg{}
}

// decode decodes a payload with vmihailenco/msgpack, integers as int64 (uint64 above
// MaxInt64), bin as []byte, maps as map[string]any.
func decode(t *testing.T, payload []byte) any {
	t.Helper()
	dec := msgpack.NewDecoder(bytes.NewReader(payload))
	v, err := dec.DecodeInterface()
	require.NoError(t, err)
	_, err = dec.DecodeInterface()
	require.Error(t, err, "one item per payload")
	return norm(v)
}

// norm turns the integers of v into int64, or uint64 where they do not fit.
func norm(v any) any {
	switch x := v.(type) {
	case int8:
		return int64(x)
	case int16:
		return int64(x)
	case int32:
		return int64(x)
	case uint8:
		return int64(x)
	case uint16:
		return int64(x)
	case uint32:
		return int64(x)
	case uint64:
		if x <= math.MaxInt64 {
			return int64(x)
		}
	case []any:
		for i := range x {
			x[i] = norm(x[i])
		}
	case map[string]any:
		for k := range x {
			x[k] = norm(x[k])
		}
	}
	return v
}

// zmtpGreeting returns a ZMTP 3.0 greeting with the NULL mechanism, as a client sends it.
func zmtpGreeting() []byte {
	g := make([]byte, 64)
	g[0], g[9], g[10], g[11] = 0xff, 0x7f, 3, 0
	copy(g[12:], "NULL")
	return g
}

// zmtpReady returns a READY command with the properties of props, names and values in turn.
func zmtpReady(props ...string) []byte {
	body := append([]byte{5}, "READY"...)
	for i := 0; i+1 < len(props); i += 2 {
		body = append(append(body, byte(len(props[i]))), props[i]...)
		body = append(binary.BigEndian.AppendUint32(body, uint32(len(props[i+1]))), props[i+1]...)
	}
	return append([]byte{0x04, byte(len(body))}, body...)
}

// requireCutOff reads conn, the connection of the peer that what describes, to its end, which
// must come before limit: the publisher has closed its side.
func requireCutOff(t *testing.T, conn net.Conn, what string) {
	t.Helper()
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(limit)))
	_, err := io.Copy(io.Discard, conn) // what the publisher sent before, then the end
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "the publisher kept the connection of %s: %v", what, err)
}

// requireServing checks that p, which has sent batch 0 of feed f, still serves after what a
// test did to it: replay answers with batch 0, and a new subscriber gets batch 1.
func requireServing(t *testing.T, f *prefix.Feed, p *Publisher) {
	t.Helper()
	seqs, _ := replay(t, p, 0)
	assert.Equal(t, []uint64{0}, seqs)
	s := subscribe(t, p, "kv@")
	f.Publish(stored(1))
	require.NoError(t, p.Flush())
	seq, _ := s.recv(t, "kv@pod-1@llama")
	assert.Equal(t, uint64(1), seq)
}
