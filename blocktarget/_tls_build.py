"""cffi build script (API mode) for `blocktarget._tls`, the OpenSSL binding of NVMe/TCP's
secure channel (TLS 1.3 with pre-shared keys, blocktarget/tls.py).

Python 3.11's `ssl` module has no PSK API at all, and TLS 1.3 external PSKs in OpenSSL go
through two session callbacks (`SSL_CTX_set_psk_find_session_callback` on the server,
`SSL_CTX_set_psk_use_session_callback` on the client) that hand OpenSSL an SSL_SESSION
carrying the key and its cipher suite. API mode so the compiler checks these declarations
against Debian's libssl-dev (several are macros: SSL_CTX_set_min_proto_version,
BIO_pending...), and the callbacks are `extern "Python"`: no C of our own is needed.

The extension is optional: without libssl-dev the compile fails, setuptools skips it with
a warning, and a secure listener or `--tls` says what is missing.
"""

from __future__ import annotations

from cffi import FFI

CDEF = r"""
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_METHOD;
typedef ... SSL_SESSION;
typedef ... SSL_CIPHER;
typedef ... BIO;
typedef ... BIO_METHOD;
typedef ... EVP_MD;

#define TLS1_3_VERSION ...
#define SSL_ERROR_NONE ...
#define SSL_ERROR_SSL ...
#define SSL_ERROR_WANT_READ ...
#define SSL_ERROR_WANT_WRITE ...
#define SSL_ERROR_SYSCALL ...
#define SSL_ERROR_ZERO_RETURN ...
#define SSL_OP_NO_TICKET ...
#define SSL_OP_ENABLE_KTLS ...
#define SSL_CLIENT_HELLO_SUCCESS ...

const SSL_METHOD *TLS_server_method(void);
const SSL_METHOD *TLS_client_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *method);
void SSL_CTX_free(SSL_CTX *ctx);
long SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version);
long SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version);
int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str);
uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);

typedef int (*SSL_psk_find_session_cb_func)(SSL *ssl, const unsigned char *identity,
                                            size_t identity_len, SSL_SESSION **sess);
typedef int (*SSL_psk_use_session_cb_func)(SSL *ssl, const EVP_MD *md,
                                           const unsigned char **id, size_t *idlen,
                                           SSL_SESSION **sess);
void SSL_CTX_set_psk_find_session_callback(SSL_CTX *ctx, SSL_psk_find_session_cb_func cb);
void SSL_CTX_set_psk_use_session_callback(SSL_CTX *ctx, SSL_psk_use_session_cb_func cb);
typedef int (*SSL_client_hello_cb_fn)(SSL *s, int *al, void *arg);
void SSL_CTX_set_client_hello_cb(SSL_CTX *c, SSL_client_hello_cb_fn cb, void *arg);
int SSL_client_hello_get0_ext(SSL *s, unsigned int type, const unsigned char **out,
                              size_t *outlen);
int SSL_set_ciphersuites(SSL *s, const char *str);
typedef void (*SSL_CTX_keylog_cb_func)(const SSL *ssl, const char *line);
void SSL_CTX_set_keylog_callback(SSL_CTX *ctx, SSL_CTX_keylog_cb_func cb);

SSL *SSL_new(SSL_CTX *ctx);
void SSL_free(SSL *ssl);
void SSL_set_accept_state(SSL *ssl);
void SSL_set_connect_state(SSL *ssl);
int SSL_set_app_data(SSL *ssl, void *arg);
void *SSL_get_app_data(const SSL *ssl);
void SSL_set_bio(SSL *ssl, BIO *rbio, BIO *wbio);
int SSL_do_handshake(SSL *ssl);
int SSL_is_init_finished(const SSL *ssl);
int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);
int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written);
int SSL_shutdown(SSL *ssl);
int SSL_get_error(const SSL *ssl, int ret);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *cipher);
const SSL_CIPHER *SSL_CIPHER_find(SSL *ssl, const unsigned char *ptr);
const char *SSL_get_version(const SSL *ssl);

SSL_SESSION *SSL_SESSION_new(void);
void SSL_SESSION_free(SSL_SESSION *ses);
int SSL_SESSION_set1_master_key(SSL_SESSION *sess, const unsigned char *in, size_t len);
int SSL_SESSION_set_cipher(SSL_SESSION *s, const SSL_CIPHER *cipher);
int SSL_SESSION_set_protocol_version(SSL_SESSION *s, int version);

const BIO_METHOD *BIO_s_mem(void);
BIO *BIO_new(const BIO_METHOD *type);
int BIO_read(BIO *b, void *data, int dlen);
int BIO_write(BIO *b, const void *data, int dlen);
size_t BIO_ctrl_pending(BIO *b);

unsigned long ERR_get_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
void ERR_clear_error(void);
void OPENSSL_cleanse(void *ptr, size_t len);

extern "Python" int bt_tls_find_session(SSL *, const unsigned char *, size_t, SSL_SESSION **);
extern "Python" int bt_tls_client_hello(SSL *, int *, void *);
extern "Python" void bt_tls_keylog(const SSL *, const char *);
extern "Python" int bt_tls_use_session(SSL *, const EVP_MD *, const unsigned char **, size_t *,
                                       SSL_SESSION **);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "blocktarget._tls",
    "#include <openssl/ssl.h>\n#include <openssl/err.h>\n#include <openssl/crypto.h>\n",
    libraries=["ssl", "crypto"],
    # a missing libssl-dev must not fail `pip install`; secure listeners report it
    optional=True,
)

if __name__ == "__main__":  # `python blocktarget/_tls_build.py` builds it in place
    ffibuilder.compile(verbose=True)
