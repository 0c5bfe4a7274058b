/*
 * nullfs_ll: the ceiling of the kernel's FUSE protocol itself, for the
 * performance evidence.  Same behaviour as nullfs.py (one file /f of a fixed
 * size, reads answered from a zero buffer, writes acknowledged and dropped),
 * written against libfuse's low-level API and served by ONE thread, as
 * pyfuse3 serves dmemfs.  What this cannot do, no FUSE daemon on one thread
 * can.
 *
 *   gcc -O2 -Wall -o /tmp/nullfs_ll tools/benchlib/nullfs_ll.c $(pkg-config --cflags --libs fuse3)
 *   /tmp/nullfs_ll MOUNTPOINT [-o max_threads=1] &      # fusermount3 -u MOUNTPOINT ends it
 *   NULLFS_SIZE=1073741824 (default) sets the file size; NULLFS_WRITEBACK=1 asks the kernel
 *   for the writeback cache (FUSE_CAP_WRITEBACK_CACHE); NULLFS_KILLPRIV=1 for
 *   FUSE_CAP_HANDLE_KILLPRIV; NULLFS_GETXATTR=1 answers GETXATTR with EOPNOTSUPP, as dmemfs
 *   does for security.* names (unset: ENOSYS, and the kernel stops asking).
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FILE_INO 2
static off_t file_size = 1L << 30;
static char zero[4 << 20];

static void fill(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_blksize = 4096;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 01777;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0666;
        st->st_nlink = 1;
        st->st_size = file_size;
        st->st_blocks = file_size / 512;
    }
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = FILE_INO;
    e.attr_timeout = e.entry_timeout = 300.0; /* pyfuse3's default */
    fill(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    fill(ino, &st);
    fuse_reply_attr(req, &st, 300.0);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    (void)attr; (void)to_set;
    ll_getattr(req, ino, fi);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    if (off >= file_size)
        size = 0;
    else if ((off_t)size > file_size - off)
        size = file_size - off;
    if (size > sizeof(zero))
        size = sizeof(zero);
    fuse_reply_buf(req, zero, size);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)ino; (void)buf; (void)off; (void)fi;
    fuse_reply_write(req, size);
}

static void ll_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)datasync;
    ll_ok(req, ino, fi);
}

static unsigned long getxattr_calls;

/* NULLFS_GETXATTR=EOPNOTSUPP answers like dmemfs does for security.*; unset: ENOSYS, after
 * which the kernel stops asking (fc->no_getxattr). */
static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    (void)ino; (void)name; (void)size;
    getxattr_calls++;
    fuse_reply_err(req, getenv("NULLFS_GETXATTR") ? EOPNOTSUPP : ENOSYS);
}

static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    if (getenv("NULLFS_WRITEBACK") && (conn->capable & FUSE_CAP_WRITEBACK_CACHE))
        conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    if (getenv("NULLFS_KILLPRIV") && (conn->capable & FUSE_CAP_HANDLE_KILLPRIV))
        conn->want |= FUSE_CAP_HANDLE_KILLPRIV;
}

static void ll_destroy(void *userdata)
{
    (void)userdata;
    fprintf(stderr, "nullfs_ll: %lu GETXATTR requests\n", getxattr_calls);
}

static const struct fuse_lowlevel_ops ops = {
    .init = ll_init,
    .destroy = ll_destroy,
    .getxattr = ll_getxattr,
    .lookup = ll_lookup,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_ok,
    .release = ll_ok,
    .fsync = ll_fsync,
};

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_cmdline_opts opts;
    struct fuse_session *se;
    const char *env = getenv("NULLFS_SIZE");
    int ret = 1;

    if (env)
        file_size = atoll(env);
    if (fuse_parse_cmdline(&args, &opts) != 0 || !opts.mountpoint) {
        fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
        return 1;
    }
    se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (se && fuse_set_signal_handlers(se) == 0) {
        if (fuse_session_mount(se, opts.mountpoint) == 0) {
            ret = fuse_session_loop(se); /* one thread, like pyfuse3 */
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    if (se)
        fuse_session_destroy(se);
    free(opts.mountpoint);
    fuse_opt_free_args(&args);
    return ret ? 1 : 0;
}
