// Package pyclient runs Python programs that tests use as clients this project did not write:
// Debian's /usr/bin/python3 with python3-zmq, python3-msgpack and python3-cbor2 (apt-get
// install python3-zmq python3-msgpack python3-cbor2; .ci/run installs them).
//
// Require skips a test when the interpreter or a module is missing, and fails it instead when
// CI=true or PAGEDKV_REQUIRE_PYTHON=1, so that a green CI run proves the clients ran. Tests name
// /usr/bin/python3, not the first python3 on PATH, which may be another installation (pyenv)
// that does not see Debian's modules.
package pyclient

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Python is the interpreter the clients run on.
const Python = "/usr/bin/python3"

// RequireEnv is the variable that turns missing Python modules from a skip into a failure; CI=true
// does the same.
const RequireEnv = "PAGEDKV_REQUIRE_PYTHON"

// Required reports whether the environment demands the Python clients.
func Required() bool { return os.Getenv(RequireEnv) == "1" || os.Getenv("CI") == "true" }

// Require checks that Python imports every module, or skips the test (fails it when Required).
func Require(tb testing.TB, modules ...string) {
	tb.Helper()
	src := "import sys\n"
	for _, m := range modules {
		src += "import " + m + "\n"
	}
	out, err := exec.Command(Python, "-c", src).CombinedOutput()
	if err == nil {
		return
	}
	if Required() {
		tb.Fatalf("%s=1 or CI=true, but %s cannot import %v: %v: %s", RequireEnv, Python, modules, err, out)
	}
	tb.Skipf("%s cannot import %v (%v); apt-get install python3-zmq python3-msgpack python3-cbor2, or set %s=1 to fail instead", Python, modules, err, RequireEnv)
}

// Run runs the Python program src with args, stdin as its input, and returns its standard
// output; it fails the test when the program fails or runs past limit.
func Run(tb testing.TB, limit time.Duration, src string, stdin []byte, args ...string) []byte {
	tb.Helper()
	p := Start(tb, limit, src, args...)
	if _, err := p.In.Write(stdin); err != nil {
		tb.Errorf("python: write stdin: %v", err)
	}
	return p.Wait(tb)
}

// Proc is a Python program started by Start: the test writes to In and reads lines from Out.
type Proc struct {
	In     io.WriteCloser
	Out    *bufio.Reader
	cmd    *exec.Cmd
	cancel context.CancelFunc
	stderr bytes.Buffer
}

// Start starts the Python program src with args, killed when it runs past limit (or when the
// test ends).
func Start(tb testing.TB, limit time.Duration, src string, args ...string) *Proc {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	tb.Cleanup(cancel)
	p := &Proc{cmd: exec.CommandContext(ctx, Python, append([]string{"-c", src}, args...)...), cancel: cancel}
	p.cmd.Stderr = &p.stderr
	in, err := p.cmd.StdinPipe()
	if err != nil {
		tb.Fatalf("python: %v", err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		tb.Fatalf("python: %v", err)
	}
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", Python, err)
	}
	p.In, p.Out = in, bufio.NewReader(out)
	return p
}

// Line reads one line of the program's output, without its newline; it fails the test at the
// end of the output.
func (p *Proc) Line(tb testing.TB) string {
	tb.Helper()
	line, err := p.Out.ReadString('\n')
	if err != nil {
		p.cancel()
		_ = p.cmd.Wait()
		tb.Fatalf("python: read a line: %v (got %q)\nstderr:\n%s", err, line, p.stderr.Bytes())
	}
	return strings.TrimSuffix(line, "\n")
}

// Wait closes the program's input, reads the rest of its output and waits for it to exit; it
// fails the test when the program fails.
func (p *Proc) Wait(tb testing.TB) []byte {
	tb.Helper()
	_ = p.In.Close()
	rest, _ := io.ReadAll(p.Out)
	err := p.cmd.Wait()
	p.cancel()
	if err != nil {
		tb.Fatalf("python: %v\nstdout:\n%s\nstderr:\n%s", err, rest, p.stderr.Bytes())
	}
	return rest
}
