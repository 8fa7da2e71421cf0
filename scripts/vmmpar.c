// vmmpar: do the CUDA VMM calls of two GPUs overlap when two C threads make them? One pthread per
// GPU, its primary context current, grows (cuMemCreate + cuMemMap + cuMemSetAccess) and shrinks
// (cuMemUnmap + cuMemRelease) 40 pages of 128 MiB, alone and both at once; p50s printed.
// No CUDA toolkit needed: gcc -O2 -o .gpu/vmmpar scripts/vmmpar.c -ldl -lpthread, run on a
// two-GPU machine. Compared in docs/performance.md with the bench program's multicalls section.
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef int CUresult; typedef int CUdevice; typedef void* CUcontext; typedef unsigned long long CUdeviceptr; typedef unsigned long long CUhandle;
typedef struct { int type; int id; } Loc;
typedef struct { int type; int handleTypes; Loc loc; void* win32; unsigned char c, rdma; unsigned short usage; unsigned char res[4]; } Prop;
typedef struct { Loc loc; int flags; } Access;
static CUresult (*cuInit)(unsigned); static CUresult (*cuDeviceGet)(CUdevice*, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice); static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuMemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
static CUresult (*cuMemCreate)(CUhandle*, size_t, const Prop*, unsigned long long);
static CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUhandle, unsigned long long);
static CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const Access*, size_t);
static CUresult (*cuMemUnmap)(CUdeviceptr, size_t); static CUresult (*cuMemRelease)(CUhandle);
#define N 40
#define SZ (128ull<<20)
static CUcontext ctx[2]; static int setcur, batch; /* batch: all grows, then all shrinks */
static pthread_barrier_t bar;
typedef struct { int dev; double grow[N], shrink[N]; } Arg;
static CUhandle hs[2][N];
static double now(void){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e6+t.tv_nsec/1e3; }
#define CK(x) do{ CUresult r=(x); if(r){ fprintf(stderr,"%s = %d\n",#x,r); exit(1);} }while(0)
static void* run(void* p){ Arg* a=p; CK(cuCtxSetCurrent(ctx[a->dev])); CUdeviceptr base; CK(cuMemAddressReserve(&base,SZ*N,0,0,0));
  Prop pr; memset(&pr,0,sizeof pr); pr.type=1; pr.loc.type=1; pr.loc.id=a->dev; Access ac={{1,a->dev},3};
  for(int i=0;i<N;i++){ pthread_barrier_wait(&bar); double t0=now(); CUhandle h;
    if(setcur) CK(cuCtxSetCurrent(ctx[a->dev]));
    CK(cuMemCreate(&h,SZ,&pr,0));
    if(setcur) CK(cuCtxSetCurrent(ctx[a->dev]));
    CK(cuMemMap(base+i*SZ,SZ,0,h,0));
    if(setcur) CK(cuCtxSetCurrent(ctx[a->dev]));
    CK(cuMemSetAccess(base+i*SZ,SZ,&ac,1));
    double t1=now(); a->grow[i]=t1-t0; hs[a->dev][i]=h;
    if(!batch){ pthread_barrier_wait(&bar); t1=now(); CK(cuMemUnmap(base+i*SZ,SZ)); CK(cuMemRelease(h)); a->shrink[i]=now()-t1; } }
  for(int i=0;batch&&i<N;i++){ pthread_barrier_wait(&bar); double t1=now(); CK(cuMemUnmap(base+i*SZ,SZ)); CK(cuMemRelease(hs[a->dev][i])); a->shrink[i]=now()-t1; }
  return 0; }
static int cmp(const void*a,const void*b){ double x=*(double*)a,y=*(double*)b; return x<y?-1:x>y; }
static double med(double*v){ double c[N]; memcpy(c,v,sizeof c); qsort(c,N,sizeof(double),cmp); return c[N/2]; }
int main(int argc,char**argv){ void* l=dlopen("libcuda.so.1",RTLD_NOW); if(!l){puts("no libcuda");return 1;}
#define S(f) *(void**)&f=dlsym(l,#f)
  S(cuInit);S(cuDeviceGet);S(cuDevicePrimaryCtxRetain);S(cuCtxSetCurrent);S(cuMemAddressReserve);S(cuMemCreate);S(cuMemMap);S(cuMemSetAccess);S(cuMemUnmap);S(cuMemRelease);
  CK(cuInit(0)); for(int d=0;d<2;d++){ CUdevice dv; CK(cuDeviceGet(&dv,d)); CK(cuDevicePrimaryCtxRetain(&ctx[d],dv)); }
  for(batch=0; batch<2; batch++) for(int both=0;both<2;both++) for(int rep=0;rep<2;rep++){
    int n=both?2:1; pthread_barrier_init(&bar,0,n); pthread_t th[2]; Arg a[2]={{0},{1}};
    for(int t=0;t<n;t++) pthread_create(&th[t],0,run,&a[t]);
    for(int t=0;t<n;t++) pthread_join(th[t],0);
    printf("%s %s rep %d: grow p50 %.1f us (dev0) %.1f (dev1); shrink %.1f / %.1f\n", batch?"grow 40, then shrink 40":"grow+shrink each page", both?"both at once":"dev0 alone", rep,
      med(a[0].grow), both?med(a[1].grow):0, med(a[0].shrink), both?med(a[1].shrink):0); }
  return 0; }
