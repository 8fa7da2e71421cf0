package kvevents

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-zeromq/zmq4"
	"github.com/go-zeromq/zmq4/transport"
)

// The publisher's sockets reach their peers through guarded connections, because go-zeromq
// trusts its peers: it allocates whatever length a frame header declares (a peer can make the
// process run out of memory or panic), indexes a READY command's properties without checking
// their lengths (a panic), panics on a socket type it does not know and keeps the connection of
// one it refuses open for good, queues what a PUB socket's peer sends besides subscriptions for
// a Recv that never comes (ten such block the next one's connection for good), does each peer's
// handshake in its accept loop with no deadline (a silent peer holds up every later one), and
// writes to each subscriber in turn with no deadline (one that stops reading stalls all).
//
// A guarded connection reads ahead of the socket: it passes the greeting and message bodies
// through, and holds frame headers, whole commands and a PUB socket's whole messages until
// checked. It cuts the peer off, as a closed connection, when a frame or message is longer than
// a subscription or replay request can be, when a command is malformed, when the peer's READY
// declares a socket type that its socket does not talk to, when a PUB socket's peer sends a
// message that is not a subscription, when the handshake takes longer than handshakeTimeout, or
// when a write blocks longer than writeTimeout. It drops the commands that a PUB socket's peer
// sends after the handshake (a ZMTP 3.1 PING). The sockets never receive more than
// subscriptions and replay requests, so the bounds cost nothing.

// Bounds of the guarded connections.
const (
	maxFrame         = 64 << 10
	maxMessage       = 256 << 10
	handshakeTimeout = 5 * time.Second
	writeTimeout     = 10 * time.Second
)

// peerTypes gives the socket types that each kind of the publisher's sockets talks to, as
// go-zeromq's SocketType.IsCompatible has them.
var peerTypes = map[zmq4.SocketType][]zmq4.SocketType{
	zmq4.Pub:    {zmq4.Sub, zmq4.XSub},
	zmq4.Router: {zmq4.Dealer, zmq4.Req, zmq4.Router},
}

var registerOnce sync.Once

// registerGuard registers the guarded transports once per process: one for each kind of socket
// in peerTypes and each network, under a name of this package's own (guardScheme).
func registerGuard() {
	registerOnce.Do(func() {
		for sck := range peerTypes {
			for _, network := range []string{"tcp", "unix"} {
				// The names are this package's own: registering them cannot collide.
				_ = zmq4.RegisterTransport(guardScheme(sck, network), guarded{inner: transport.New(network), sck: sck})
			}
		}
	})
}

// guardScheme names the guarded transport of network for a socket of type sck.
func guardScheme(sck zmq4.SocketType, network string) string {
	return "pagedkv+" + strings.ToLower(string(sck)) + "+" + network
}

// guardedEndpoint returns ep with its transport replaced by the guarded one of a socket of type
// sck.
func guardedEndpoint(ep string, sck zmq4.SocketType) string {
	for _, s := range []struct{ from, network string }{{"tcp://", "tcp"}, {"ipc://", "unix"}} {
		if rest, ok := strings.CutPrefix(ep, s.from); ok && rest != "" {
			return guardScheme(sck, s.network) + "://" + rest
		}
	}
	return ep
}

// guarded is a go-zeromq transport whose connections are guards of a socket of type sck.
type guarded struct {
	inner transport.Transport
	sck   zmq4.SocketType
}

func (g guarded) Dial(ctx context.Context, d transport.Dialer, addr string) (net.Conn, error) {
	c, err := g.inner.Dial(ctx, d, addr)
	if err != nil {
		return nil, err
	}
	return newGuard(ctx, c, g.sck), nil
}

func (g guarded) Listen(ctx context.Context, addr string) (net.Listener, error) {
	l, err := g.inner.Listen(ctx, addr)
	if err != nil {
		return nil, err
	}
	return guardListener{l, ctx, g.sck}, nil
}

func (g guarded) Addr(ep string) (string, error) { return g.inner.Addr(ep) }

// guardListener accepts guards of the socket that listens: its type is sck, its life ctx.
type guardListener struct {
	net.Listener
	ctx context.Context
	sck zmq4.SocketType
}

func (l guardListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newGuard(l.ctx, c, l.sck), nil
}

// errCutOff ends a guarded connection. It wraps io.EOF so that go-zeromq drops the connection
// as one the peer closed.
var errCutOff = fmt.Errorf("kvevents: peer cut off: %w", io.EOF)

// guard is a connection whose peer is checked as described above.
type guard struct {
	net.Conn
	pending []byte      // checked bytes not yet read
	body    int64       // bytes of the current message frame's body still to pass through
	message int64       // bytes of the current message so far
	greeted bool        // the greeting has been passed
	ready   atomic.Bool // the peer's READY command has been passed: the handshake is done
	hdr     [9]byte
	cmd     []byte
	timer   *time.Timer     // closes the connection unless the handshake is done in time
	stop    func() bool     // releases the close at the socket's end
	sck     zmq4.SocketType // the type of the guarded socket
}

// newGuard guards c, a connection of a socket of type sck whose life is ctx.
func newGuard(ctx context.Context, c net.Conn, sck zmq4.SocketType) *guard {
	g := &guard{Conn: c, sck: sck}
	// go-zeromq closes the connections it holds when its socket closes, but it adds one whose
	// handshake ends after that and never closes it: the socket's end closes every guard.
	g.stop = context.AfterFunc(ctx, func() { _ = c.Close() })
	// Closing, not a deadline: go-zeromq leaves the connection of a failed handshake open, and
	// nobody reads it again.
	g.timer = time.AfterFunc(handshakeTimeout, func() {
		if !g.ready.Load() {
			_ = g.Close()
		}
	})
	return g
}

// Close closes the connection and releases its close at the socket's end.
func (g *guard) Close() error {
	g.stop()
	return g.Conn.Close()
}

// Read returns checked bytes.
func (g *guard) Read(p []byte) (int, error) {
	for len(g.pending) == 0 {
		if g.body > 0 {
			n, err := g.Conn.Read(p[:min(int64(len(p)), g.body)])
			g.body -= int64(n)
			return n, g.cut(err)
		}
		if err := g.next(); err != nil {
			return 0, g.cut(err)
		}
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

// Write writes p within writeTimeout once the handshake is done, cutting the peer off when it
// does not read.
func (g *guard) Write(p []byte) (int, error) {
	if g.ready.Load() {
		_ = g.Conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	}
	n, err := g.Conn.Write(p)
	return n, g.cut(err)
}

// cut closes the connection on any error but a clean end, which it returns as io.EOF.
func (g *guard) cut(err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	_ = g.Close()
	if errors.Is(err, io.EOF) {
		return err
	}
	return fmt.Errorf("%w (%v)", errCutOff, err)
}

// next reads the next unit from the peer (the greeting, a frame header, or a whole command),
// checks it and queues it in pending.
func (g *guard) next() error {
	if !g.greeted {
		g.greeted = true
		g.pending = make([]byte, 64) // the ZMTP greeting: its signature and major version 3 or later
		if _, err := io.ReadFull(g.Conn, g.pending); err != nil {
			return err
		}
		if g.pending[0] != 0xff || g.pending[9]&1 != 1 || g.pending[10] < 3 {
			return errCutOff
		}
		return nil
	}
	if _, err := io.ReadFull(g.Conn, g.hdr[:2]); err != nil {
		return err
	}
	flags, n := g.hdr[0], 2
	size := uint64(g.hdr[1])
	if flags&0x02 != 0 { // a long frame: an 8-byte length
		if _, err := io.ReadFull(g.Conn, g.hdr[2:9]); err != nil {
			return err
		}
		size, n = binary.BigEndian.Uint64(g.hdr[1:9]), 9
	}
	if flags&^0x07 != 0 || size > maxFrame || uint64(g.message)+size > maxMessage {
		return errCutOff
	}
	if flags&0x04 == 0 && g.sck == zmq4.Pub {
		return g.subscription(flags, size, n)
	}
	g.pending = g.hdr[:n]
	if flags&0x04 == 0 { // a message frame: its body passes through
		g.body = int64(size)
		g.message += int64(size)
		if flags&0x01 == 0 { // the message's last frame
			g.message = 0
		}
		return nil
	}
	g.cmd = append(g.cmd[:0], g.hdr[:n]...)
	g.cmd = append(g.cmd, make([]byte, size)...)
	if _, err := io.ReadFull(g.Conn, g.cmd[n:]); err != nil {
		return err
	}
	if !checkCommand(g.cmd[n:], peerTypes[g.sck]) {
		return errCutOff
	}
	if g.sck == zmq4.Pub && g.ready.Load() { // go-zeromq's PUB socket would queue it as a message
		g.pending = nil
		return nil
	}
	if !g.ready.Load() && commandName(g.cmd[n:]) == "READY" {
		g.ready.Store(true)
		g.timer.Stop()
	}
	g.pending = g.cmd
	return nil
}

// subscription queues a message frame of a PUB socket's peer, whose header is in g.hdr[:n]: it
// must be a whole subscription or its cancel, one frame whose first byte is 1 or 0. go-zeromq's
// PUB socket queues any other message for a Recv that a PUB socket does not serve, and once
// ten wait, blocks the reader of the connection that sends one more for good.
func (g *guard) subscription(flags byte, size uint64, n int) error {
	if flags&0x01 != 0 || size == 0 {
		return errCutOff
	}
	g.cmd = append(append(g.cmd[:0], g.hdr[:n]...), make([]byte, size)...)
	if _, err := io.ReadFull(g.Conn, g.cmd[n:]); err != nil {
		return err
	}
	if g.cmd[n] > 1 {
		return errCutOff
	}
	g.pending = g.cmd
	return nil
}

// commandName returns the name of a well-formed command.
func commandName(body []byte) string { return string(body[1 : 1+body[0]]) }

// checkCommand reports whether a command's body holds its name, and for READY properties
// whose lengths fit, as go-zeromq assumes, and a socket type among peers.
func checkCommand(body []byte, peers []zmq4.SocketType) bool {
	if len(body) == 0 || int(body[0]) > len(body)-1 {
		return false
	}
	if commandName(body) != "READY" {
		return true
	}
	p := body[1+body[0]:]
	for len(p) > 0 {
		k := int(p[0])
		if len(p) < 1+k+4 {
			return false
		}
		v := binary.BigEndian.Uint32(p[1+k:])
		p = p[1+k+4:]
		if uint64(v) > uint64(len(p)) {
			return false
		}
		p = p[v:]
	}
	// go-zeromq's own reading of the properties, which now fit: it panics on a Socket-Type it
	// does not know.
	md := make(zmq4.Metadata)
	if md.UnmarshalZMTP(body[1+body[0]:]) != nil {
		return false
	}
	return slices.Contains(peers, zmq4.SocketType(md["Socket-Type"]))
}
