package cuda

// procs holds the resolved entry points. Each field is named after the plain cuda.h name; the
// table below says which versioned symbol it is loaded from (cuda.h #defines the plain names to
// these versions, so dlsym must ask for the version).
var procs procTable

// procTable is the set of driver entry points, one field per symbol.
type procTable struct {
	cuInit, cuDriverGetVersion                                            uintptr
	cuDeviceGet, cuDeviceGetCount, cuDeviceGetAttribute, cuDeviceGetName  uintptr
	cuDeviceTotalMem                                                      uintptr
	cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRelease, cuCtxSetCurrent  uintptr
	cuCtxSynchronize                                                      uintptr
	cuMemGetInfo, cuMemAlloc, cuMemFree                                   uintptr
	cuMemAddressReserve, cuMemAddressFree, cuMemCreate, cuMemRelease      uintptr
	cuMemMap, cuMemUnmap, cuMemSetAccess, cuMemGetAllocationGranularity   uintptr
	cuMemsetD8, cuMemsetD8Async                                           uintptr
	cuMemcpyHtoD, cuMemcpyDtoH, cuMemcpyDtoD, cuMemcpyDtoDAsync           uintptr
	cuMemcpyHtoDAsync, cuMemcpyDtoHAsync                                  uintptr
	cuMemAllocHost, cuMemFreeHost                                         uintptr
	cuStreamCreate, cuStreamDestroy, cuStreamSynchronize                  uintptr
	cuEventCreate, cuEventRecord, cuEventSynchronize, cuEventElapsedTime  uintptr
	cuEventDestroy, cuEventQuery, cuStreamWaitEvent                       uintptr
	cuModuleLoadData, cuModuleUnload, cuModuleGetFunction, cuLaunchKernel uintptr
	cuFuncGetAttribute                                                    uintptr
}

// symbol ties a procs field to the names to try, newest first. Only the first name that resolves
// is used; a symbol with no name resolving makes Load fail, so a driver too old for the project
// is reported once, up front, instead of at the first use.
type symbol struct {
	dst   *uintptr
	names []string
}

// symbolTable lists the symbols to resolve into p.
func symbolTable(p *procTable) []symbol {
	return []symbol{
		{&p.cuInit, []string{"cuInit"}},
		{&p.cuDriverGetVersion, []string{"cuDriverGetVersion"}},
		{&p.cuDeviceGet, []string{"cuDeviceGet"}},
		{&p.cuDeviceGetCount, []string{"cuDeviceGetCount"}},
		{&p.cuDeviceGetAttribute, []string{"cuDeviceGetAttribute"}},
		{&p.cuDeviceGetName, []string{"cuDeviceGetName"}},
		{&p.cuDeviceTotalMem, []string{"cuDeviceTotalMem_v2"}},
		{&p.cuDevicePrimaryCtxRetain, []string{"cuDevicePrimaryCtxRetain"}},
		{&p.cuDevicePrimaryCtxRelease, []string{"cuDevicePrimaryCtxRelease_v2"}},
		{&p.cuCtxSetCurrent, []string{"cuCtxSetCurrent"}},
		{&p.cuCtxSynchronize, []string{"cuCtxSynchronize"}},
		{&p.cuMemGetInfo, []string{"cuMemGetInfo_v2"}},
		{&p.cuMemAlloc, []string{"cuMemAlloc_v2"}},
		{&p.cuMemFree, []string{"cuMemFree_v2"}},
		{&p.cuMemAddressReserve, []string{"cuMemAddressReserve"}},
		{&p.cuMemAddressFree, []string{"cuMemAddressFree"}},
		{&p.cuMemCreate, []string{"cuMemCreate"}},
		{&p.cuMemRelease, []string{"cuMemRelease"}},
		{&p.cuMemMap, []string{"cuMemMap"}},
		{&p.cuMemUnmap, []string{"cuMemUnmap"}},
		{&p.cuMemSetAccess, []string{"cuMemSetAccess"}},
		{&p.cuMemGetAllocationGranularity, []string{"cuMemGetAllocationGranularity"}},
		{&p.cuMemsetD8, []string{"cuMemsetD8_v2"}},
		{&p.cuMemsetD8Async, []string{"cuMemsetD8Async"}},
		{&p.cuMemcpyHtoD, []string{"cuMemcpyHtoD_v2"}},
		{&p.cuMemcpyDtoH, []string{"cuMemcpyDtoH_v2"}},
		{&p.cuMemcpyDtoD, []string{"cuMemcpyDtoD_v2"}},
		{&p.cuMemcpyDtoDAsync, []string{"cuMemcpyDtoDAsync_v2"}},
		{&p.cuMemcpyHtoDAsync, []string{"cuMemcpyHtoDAsync_v2"}},
		{&p.cuMemcpyDtoHAsync, []string{"cuMemcpyDtoHAsync_v2"}},
		{&p.cuMemAllocHost, []string{"cuMemAllocHost_v2"}},
		{&p.cuMemFreeHost, []string{"cuMemFreeHost"}},
		{&p.cuStreamCreate, []string{"cuStreamCreate"}},
		{&p.cuStreamDestroy, []string{"cuStreamDestroy_v2"}},
		{&p.cuStreamSynchronize, []string{"cuStreamSynchronize"}},
		{&p.cuEventCreate, []string{"cuEventCreate"}},
		{&p.cuEventRecord, []string{"cuEventRecord"}},
		{&p.cuEventSynchronize, []string{"cuEventSynchronize"}},
		{&p.cuEventElapsedTime, []string{"cuEventElapsedTime_v2", "cuEventElapsedTime"}},
		{&p.cuEventDestroy, []string{"cuEventDestroy_v2"}},
		{&p.cuEventQuery, []string{"cuEventQuery"}},
		{&p.cuStreamWaitEvent, []string{"cuStreamWaitEvent"}},
		{&p.cuModuleLoadData, []string{"cuModuleLoadData"}},
		{&p.cuModuleUnload, []string{"cuModuleUnload"}},
		{&p.cuModuleGetFunction, []string{"cuModuleGetFunction"}},
		{&p.cuLaunchKernel, []string{"cuLaunchKernel"}},
		{&p.cuFuncGetAttribute, []string{"cuFuncGetAttribute"}},
	}
}
