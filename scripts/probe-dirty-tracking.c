// Probe: on a MAP_PRIVATE mapping of a file, can the kernel tell which pages were written since
// a point (PAGEMAP_SCAN + userfaultfd async write-protect), and what do pagemap bits say?
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <stdint.h>
#include <time.h>
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#define UFFD_FEATURE_WP_ASYNC (1<<15)
struct page_region { uint64_t start, end, categories; };
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
struct pm_scan_arg { uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask; };
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)

static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}

int main(int argc,char**argv){
  size_t pages = argc>1? atol(argv[1]) : 262144; // 1 GiB
  size_t len = pages*4096;
  int fd = open("probe-file", O_RDWR|O_CREAT|O_TRUNC, 0600);
  if (ftruncate(fd, len)) {perror("ftruncate");return 1;}
  for (int mode=0; mode<2; mode++){
  int flags = mode==0? MAP_PRIVATE : MAP_SHARED;
  char*p = mmap(NULL,len,PROT_READ|PROT_WRITE,flags,fd,0);
  if(p==MAP_FAILED){perror("mmap");return 1;}
  for(size_t i=0;i<pages;i+=1) (void)*(volatile char*)(p+i*4096); // read all in
  int uffd = syscall(SYS_userfaultfd, O_CLOEXEC|O_NONBLOCK);
  if(uffd<0){perror("userfaultfd");return 1;}
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_WP_UNPOPULATED};
  if(ioctl(uffd,UFFDIO_API,&api)){perror("UFFDIO_API");return 1;}
  struct uffdio_register reg={.range={(uintptr_t)p,len},.mode=UFFDIO_REGISTER_MODE_WP};
  if(ioctl(uffd,UFFDIO_REGISTER,&reg)){printf("%s: UFFDIO_REGISTER WP: %s\n", mode?"shared":"private", strerror(errno)); continue;}
  struct uffdio_writeprotect wp={.range={(uintptr_t)p,len},.mode=UFFDIO_WRITEPROTECT_MODE_WP};
  double t0=now();
  if(ioctl(uffd,UFFDIO_WRITEPROTECT,&wp)){perror("WRITEPROTECT");return 1;}
  double t1=now();
  // write 1000 random pages
  srand(1);
  for(int i=0;i<1000;i++){ size_t pg=rand()%pages; p[pg*4096+8]=1; }
  double t2=now();
  struct page_region regions[4096];
  struct pm_scan_arg arg={.size=sizeof(arg),.flags=PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC,.start=(uintptr_t)p,.end=(uintptr_t)p+len,
    .vec=(uintptr_t)regions,.vec_len=4096,.max_pages=0,.category_inverted=0,.category_mask=PAGE_IS_WRITTEN,.category_anyof_mask=0,.return_mask=PAGE_IS_WRITTEN};
  int fdp=open("/proc/self/pagemap",O_RDONLY);
  long n=ioctl(fdp,PAGEMAP_SCAN,&arg);
  double t3=now();
  if(n<0){printf("%s: PAGEMAP_SCAN: %s\n",mode?"shared":"private",strerror(errno));continue;}
  size_t written=0; for(long i=0;i<n;i++) written += (regions[i].end-regions[i].start)/4096;
  // second scan right after (re-protected): should find nothing
  arg.walk_end=0;
  long n2=ioctl(fdp,PAGEMAP_SCAN,&arg);
  double t4=now();
  printf("%s: wp all %.3f ms, 1000 writes %.3f ms, scan %ld regions %zu pages %.3f ms, rescan %ld regions %.3f ms\n",
    mode?"shared":"private",(t1-t0)*1e3,(t2-t1)*1e3,n,written,(t3-t2)*1e3,n2,(t4-t3)*1e3);
  munmap(p,len); close(uffd); close(fdp);
  }
  return 0;
}
