// Package proctest runs a test binary's own code in child processes: a test starts a child by
// role, talks to it line by line over its stdin and stdout, and can kill it with SIGKILL. The
// test binary's TestMain calls Main first, which runs the role and exits when the binary was
// started as a child.
package proctest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// roleEnv names the role a child runs; argsEnv carries its arguments.
const (
	roleEnv = "PAGEDKV_PROCTEST_ROLE"
	argsEnv = "PAGEDKV_PROCTEST_ARGS"
)

// A Role is a child's main: args are what Start was given, in reads the test's lines, out
// writes lines back. Returning ends the child with status 0; an error, status 1.
type Role func(args []string, in *bufio.Scanner, out io.Writer) error

// Main runs the role named in the environment and exits, when the binary was started as a
// child; otherwise it returns at once and the caller runs its tests.
func Main(roles map[string]Role) {
	name := os.Getenv(roleEnv)
	if name == "" {
		return
	}
	role, ok := roles[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "proctest: no role %q\n", name)
		os.Exit(2)
	}
	var args []string
	if a := os.Getenv(argsEnv); a != "" {
		args = strings.Split(a, "\x1f")
	}
	if err := role(args, bufio.NewScanner(os.Stdin), os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "proctest: role %s: %v\n", name, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Child is a running child process.
type Child struct {
	t      testing.TB
	cmd    *exec.Cmd
	in     io.WriteCloser
	lines  chan string
	stderr syncBuffer
	waited bool
	err    error
}

// Start runs role in a new process of this test binary. The child is killed and waited for
// when the test ends, if the test did not.
func Start(t testing.TB, role string, args ...string) *Child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"="+role, argsEnv+"="+strings.Join(args, "\x1f"))
	c := &Child{t: t, cmd: cmd, lines: make(chan string, 1024)}
	cmd.Stderr = &c.stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.in = in
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	t.Cleanup(func() {
		if !c.waited {
			c.cmd.Process.Kill()
			c.Wait()
		}
	})
	return c
}

// PID returns the child's process id.
func (c *Child) PID() int { return c.cmd.Process.Pid }

// Send writes one line to the child's stdin.
func (c *Child) Send(format string, a ...any) {
	c.t.Helper()
	if _, err := fmt.Fprintf(c.in, format+"\n", a...); err != nil {
		c.t.Fatalf("send to child %d: %v (stderr: %s)", c.PID(), err, c.stderr.String())
	}
}

// Expect returns the next line the child writes that starts with prefix (with the prefix cut
// off), failing the test if the child ends or d passes first. Other lines are logged.
func (c *Child) Expect(prefix string, d time.Duration) string {
	c.t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case line, ok := <-c.lines:
			if !ok {
				err := c.Wait()
				c.t.Fatalf("child %d ended (%v) before %q; stderr:\n%s", c.PID(), err, prefix, c.stderr.String())
			}
			if rest, found := strings.CutPrefix(line, prefix); found {
				return strings.TrimSpace(rest)
			}
			c.t.Logf("child %d: %s", c.PID(), line)
		case <-timer.C:
			c.t.Fatalf("child %d: no %q within %v; stderr:\n%s", c.PID(), prefix, d, c.stderr.String())
		}
	}
}

// Kill9 kills the child with SIGKILL and waits for it to be gone, so that the kernel has
// closed its files (and dropped its locks) when it returns.
func (c *Child) Kill9() {
	c.t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		c.t.Fatalf("kill child %d: %v", c.PID(), err)
	}
	c.Wait()
}

// Close closes the child's stdin (a role reading it sees the end) and waits for it to exit,
// failing the test if it fails.
func (c *Child) Close() {
	c.t.Helper()
	c.in.Close()
	if err := c.Wait(); err != nil {
		c.t.Fatalf("child %d: %v; stderr:\n%s", c.PID(), err, c.stderr.String())
	}
}

// Wait waits for the child to exit and returns its error (once; later calls return the same).
func (c *Child) Wait() error {
	if !c.waited {
		c.waited = true
		for range c.lines { // until the child closes its stdout: exec's Wait closes the pipe
		}
		c.err = c.cmd.Wait()
	}
	return c.err
}

// syncBuffer is a strings.Builder that exec's copying goroutine and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Stderr returns what the child wrote to stderr so far.
func (c *Child) Stderr() string { return c.stderr.String() }
