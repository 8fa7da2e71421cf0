package tiertrace

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
)

func TestMain(m *testing.M) {
	proctest.Main(map[string]proctest.Role{"first-half": firstHalf})
	leakcheck.Main(m)
}

// firstHalf replays the first half of the trace on the disk tier in args[0], says "half" and
// waits to be killed.
func firstHalf(args []string, in *bufio.Scanner, out io.Writer) error {
	if _, _, err := RunPart(args[0], FirstHalf); err != nil {
		return err
	}
	fmt.Fprintln(out, "half")
	in.Scan() // until killed
	os.Exit(3)
	return nil
}
