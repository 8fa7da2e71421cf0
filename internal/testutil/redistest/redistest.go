// Package redistest starts and stops redis-server processes for tests: a single node or a small
// Redis Cluster, on free loopback ports, with no persistence. Each server belongs to the test
// that started it and is killed by the test's cleanup.
//
// Tests skip when redis-server is not installed, except under CI=true, where they fail: the CI
// script installs it.
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// readyWithin bounds how long a started server or a created cluster may take to answer. It is a
// bound on a wait, not a timed assertion: a healthy server answers in milliseconds.
const readyWithin = 20 * time.Second

// Require returns the paths of redis-server and redis-cli. It skips the test when either is
// missing, and fails it under CI=true.
func Require(t testing.TB) (server, cli string) {
	t.Helper()
	server, err1 := exec.LookPath("redis-server")
	cli, err2 := exec.LookPath("redis-cli")
	if err1 == nil && err2 == nil {
		return server, cli
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("redistest: redis-server and redis-cli are required under CI=true (.ci/run installs Debian's redis-server): %v %v", err1, err2)
	}
	t.Skip("redistest: redis-server or redis-cli not installed")
	return "", ""
}

// Server is a redis-server process a test started. Its methods may be called from the test's
// goroutine only.
type Server struct {
	t        testing.TB
	bin, cli string
	Addr     string // host:port on 127.0.0.1
	Port     int
	args     []string
	dir      string
	mu       sync.Mutex // guards the following
	cmd      *exec.Cmd
	waitErr  chan error
}

// Start runs a redis-server on a free loopback port with persistence off and extra arguments
// (such as "--maxmemory", "1mb") appended, waits until it answers PING, and kills it when the
// test ends.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin, cli := Require(t)
	var lastErr error
	for range 5 { // another process may take the chosen port before the server binds it
		port, err := freePort()
		if err != nil {
			t.Fatalf("redistest: %v", err)
		}
		s := &Server{t: t, bin: bin, cli: cli, Port: port, Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: t.TempDir()}
		s.args = append([]string{
			"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
			"--dir", s.dir, "--enable-debug-command", "local", "--protected-mode", "no",
		}, extra...)
		if lastErr = s.start(); lastErr == nil {
			t.Cleanup(s.Kill)
			return s
		}
	}
	t.Fatalf("redistest: start redis-server: %v", lastErr)
	return nil
}

// freePort returns a loopback port that was free a moment ago, together with port+10000 (the
// cluster bus port) where a cluster node needs it.
func freePort() (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if port+10000 > 65535 {
			continue
		}
		bus, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+10000)))
		if err != nil {
			continue
		}
		_ = bus.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no free port pair found")
}

func (s *Server) start() error {
	cmd := exec.Command(s.bin, s.args...)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- cmd.Wait() }()
	s.mu.Lock()
	s.cmd, s.waitErr = cmd, waitErr
	s.mu.Unlock()
	deadline := time.Now().Add(readyWithin)
	for time.Now().Before(deadline) {
		select {
		case err := <-waitErr:
			s.mu.Lock()
			s.cmd = nil
			s.mu.Unlock()
			return fmt.Errorf("redis-server exited: %v: %s", err, lastLines(stderr.String()))
		default:
		}
		if ping(s.Addr) == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.Kill()
	return fmt.Errorf("redis-server on %s did not answer within %v", s.Addr, readyWithin)
}

// ping sends an inline PING and expects +PONG, or -NOAUTH from a server started with
// --requirepass: either way it answers.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") && !strings.HasPrefix(line, "-NOAUTH") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func lastLines(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}

// Kill ends the server with SIGKILL and waits for it; a killed server is a no-op.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, waitErr := s.cmd, s.waitErr
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-waitErr
}

// Restart starts a killed server again on the same port with the same arguments; it comes back
// empty (persistence is off).
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	var err error
	for range 20 { // the port may linger for a moment after the kill
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("redistest: restart redis-server on %s: %v", s.Addr, err)
}

// Do runs one command through redis-cli against the server and returns its raw output, trimmed.
// The test fails when redis-cli cannot run; a command error is in the output.
func (s *Server) Do(args ...string) string {
	s.t.Helper()
	out, err := exec.Command(s.cli, append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(s.Port)}, args...)...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("redistest: redis-cli %v: %v: %s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Cluster is a Redis Cluster of masters without replicas that a test started.
type Cluster struct {
	Nodes []*Server
}

// Addrs returns the nodes' addresses.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr
	}
	return addrs
}

// StartCluster starts n cluster-enabled servers (n >= 3), joins them with redis-cli --cluster
// create (the slots split evenly, no replicas), and waits until every node reports
// cluster_state:ok.
func StartCluster(t testing.TB, n int, extra ...string) *Cluster {
	t.Helper()
	if n < 3 {
		t.Fatalf("redistest: a cluster needs at least 3 masters, asked for %d", n)
	}
	c := &Cluster{}
	for range n {
		c.Nodes = append(c.Nodes, Start(t, append([]string{"--cluster-enabled", "yes", "--cluster-node-timeout", "5000"}, extra...)...))
	}
	args := append([]string{"--cluster", "create"}, c.Addrs()...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.Command(c.Nodes[0].cli, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("redistest: redis-cli --cluster create: %v: %s", err, lastLines(string(out)))
	}
	deadline := time.Now().Add(readyWithin)
	for _, node := range c.Nodes {
		for !strings.Contains(node.Do("CLUSTER", "INFO"), "cluster_state:ok") {
			if time.Now().After(deadline) {
				t.Fatalf("redistest: node %s not cluster_state:ok within %v", node.Addr, readyWithin)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return c
}
