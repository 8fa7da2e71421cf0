package tiertrace

import (
	"testing"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }
