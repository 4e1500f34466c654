/*
 * pigeon_auth: Mosquitto (2.0+, plugin interface v5) checks Pigeon's device tokens itself.
 *
 * A device connects with client id = username = its device id and password = its token,
 * "pg1.USER.DEVICE.EXPIRES_MS.SIG", SIG being HMAC-SHA256 (hex) of the rest under the
 * deployment's secret (bridge/tokens.py). With the same secret, this plugin lets a device in
 * without the bridge telling the broker anything at login, and gives it exactly the topics of
 * protocol section 2. Nothing is stored per device, so a login costs the broker one HMAC
 * instead of a rewrite of a dynamic-security file that grows with every device.
 *
 * Options (plugin_opt_…):
 *   secret_file   the deployment's secret (PIGEON_SECRET_FILE of the bridges); required
 *   revoked_file  where revocations are kept across restarts; required
 *
 * Decisions:
 *   - a password that is not a token signed with this secret is not ours: deferred to the next
 *     plugin (dynamic security, which knows the bridge's own client);
 *   - a signed token that expired, that names another device than the client id and username,
 *     or whose device was revoked: refused;
 *   - otherwise accepted, and the client's username becomes "pg1.USER.DEVICE", from which the
 *     access checks read who it is (when Mosquitto checks its clients again, on SIGHUP, that
 *     name with the same token is accepted too). Clients whose username does not start with
 *     "pg1." are deferred to the next plugin; a username starting with "pg1." is reserved to
 *     devices with a token, and refused otherwise.
 *
 * Commands, published by the bridge at QoS 1 on $CONTROL/pigeon-auth/v1, one per line:
 *   revoke DEVICE UNTIL_MS   refuse DEVICE's tokens until UNTIL_MS (when all it was given
 *                            have expired), kept in revoked_file before the PUBACK (should
 *                            the file not take it, it holds until Mosquitto restarts and an
 *                            error is logged); and close its connection, without its will
 *   kick DEVICE              close DEVICE's connection and publish its will, as when a
 *                            connection is lost; it may connect again
 * Mosquitto answers the PUBACK only after the plugin has carried the message out. Who may
 * publish there is up to the access control of the bridge's own client (dynamic security).
 */

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define CONTROL_TOPIC "$CONTROL/pigeon-auth/v1"
#define PREFIX "pg1."
#define PREFIX_LEN 4
#define MAX_ID 128
#define SIG_HEX 64
#define MAX_SECRET 4096

static mosquitto_plugin_id_t *plg_id;
static unsigned char secret[MAX_SECRET];
static size_t secret_len;
static char *revoked_path;

/* Revoked devices: a chained hash table of device id -> until (ms). */
struct revoked {
	struct revoked *next;
	long long until;
	char device[];
};
static struct revoked **table;
static size_t buckets;
static size_t live;
static size_t file_lines;

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL;
	for(; *s; s++){
		h ^= (unsigned char)*s;
		h *= 1099511628211ULL;
	}
	return h;
}

static struct revoked *revoked_find(const char *device)
{
	struct revoked *r;
	if(!buckets) return NULL;
	for(r = table[hash(device) & (buckets - 1)]; r; r = r->next){
		if(!strcmp(r->device, device)) return r;
	}
	return NULL;
}

static int table_resize(size_t size)
{
	struct revoked **bigger = calloc(size, sizeof(*bigger));
	size_t i;
	if(!bigger) return MOSQ_ERR_NOMEM;
	for(i = 0; i < buckets; i++){
		struct revoked *r = table[i];
		while(r){
			struct revoked *next = r->next;
			size_t b = hash(r->device) & (size - 1);
			r->next = bigger[b];
			bigger[b] = r;
			r = next;
		}
	}
	free(table);
	table = bigger;
	buckets = size;
	return MOSQ_ERR_SUCCESS;
}

static int revoked_put(const char *device, long long until)
{
	struct revoked *r = revoked_find(device);
	size_t len, b;
	if(r){
		if(until > r->until) r->until = until;
		return MOSQ_ERR_SUCCESS;
	}
	if(live + 1 > buckets * 2 && table_resize(buckets ? buckets * 2 : 1024)) return MOSQ_ERR_NOMEM;
	len = strlen(device);
	r = malloc(sizeof(*r) + len + 1);
	if(!r) return MOSQ_ERR_NOMEM;
	memcpy(r->device, device, len + 1);
	r->until = until;
	b = hash(device) & (buckets - 1);
	r->next = table[b];
	table[b] = r;
	live++;
	return MOSQ_ERR_SUCCESS;
}

/* Drop the revocations that ran out: every token they stood against has expired. */
static void revoked_purge(long long now)
{
	size_t i;
	for(i = 0; i < buckets; i++){
		struct revoked **at = &table[i];
		while(*at){
			if((*at)->until <= now){
				struct revoked *gone = *at;
				*at = gone->next;
				free(gone);
				live--;
			}else{
				at = &(*at)->next;
			}
		}
	}
}

static void table_free(void)
{
	revoked_purge(INT64_MAX);
	live = 0;
	free(table);
	table = NULL;
	buckets = 0;
}

/* A device id as tokens carry it: 1..MAX_ID characters, none of them '.', ' ', '/', '+', '#'
 * or a control character (so it can stand in a topic level and a command line). */
static bool valid_id(const char *s, size_t len)
{
	size_t i;
	if(len == 0 || len > MAX_ID) return false;
	for(i = 0; i < len; i++){
		unsigned char c = (unsigned char)s[i];
		if(c <= ' ' || c == '.' || c == '/' || c == '+' || c == '#' || c == 0x7f) return false;
	}
	return true;
}

static bool parse_ms(const char *s, size_t len, long long *out)
{
	long long v = 0;
	size_t i;
	if(len == 0 || len > 18) return false;
	for(i = 0; i < len; i++){
		if(s[i] < '0' || s[i] > '9') return false;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return true;
}

/* The rename of a file into its directory made durable. */
static void sync_dir_of(const char *path)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	int fd;
	if(!slash){
		snprintf(dir, sizeof(dir), ".");
	}else if(snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path) >= (int)sizeof(dir)){
		return;
	}
	fd = open(dir[0] ? dir : "/", O_RDONLY);
	if(fd >= 0){
		fsync(fd);
		close(fd);
	}
}

/* Rewrite the revocation file with only the live entries (write aside, then rename). */
static int revoked_compact(void)
{
	char tmp[4096];
	FILE *f;
	size_t i;
	if(snprintf(tmp, sizeof(tmp), "%s.tmp", revoked_path) >= (int)sizeof(tmp)) return MOSQ_ERR_INVAL;
	f = fopen(tmp, "w");
	if(!f) return MOSQ_ERR_ERRNO;
	for(i = 0; i < buckets; i++){
		struct revoked *r;
		for(r = table[i]; r; r = r->next){
			fprintf(f, "%s %lld\n", r->device, r->until);
		}
	}
	if(fflush(f) || fsync(fileno(f))){
		fclose(f);
		return MOSQ_ERR_ERRNO;
	}
	fclose(f);
	if(rename(tmp, revoked_path)) return MOSQ_ERR_ERRNO;
	sync_dir_of(revoked_path);
	file_lines = live;
	return MOSQ_ERR_SUCCESS;
}

static int revoked_load(void)
{
	char line[512];
	FILE *f = fopen(revoked_path, "r");
	long long now = now_ms();
	if(!f){
		if(errno == ENOENT) return revoked_compact();
		return MOSQ_ERR_ERRNO;
	}
	while(fgets(line, sizeof(line), f)){
		char *space = strchr(line, ' ');
		size_t n = strcspn(line, "\n");
		long long until;
		line[n] = '\0';
		if(!space || !valid_id(line, (size_t)(space - line))) continue;
		*space = '\0';
		if(!parse_ms(space + 1, strlen(space + 1), &until) || until <= now) continue;
		if(revoked_put(line, until)){
			fclose(f);
			return MOSQ_ERR_NOMEM;
		}
	}
	fclose(f);
	return revoked_compact();
}

/* Keep a revocation before it is acknowledged: appended and synced, the file compacted now and then. */
static int revoked_keep(const char *device, long long until)
{
	FILE *f;
	int rc = revoked_put(device, until);
	if(rc) return rc;
	if(file_lines > 2 * live + 1024){
		revoked_purge(now_ms());
		return revoked_compact();
	}
	f = fopen(revoked_path, "a");
	if(!f) return MOSQ_ERR_ERRNO;
	/* on a line of its own even after a write that failed halfway (blank lines are skipped) */
	fprintf(f, "\n%s %lld\n", device, until);
	if(fflush(f) || fsync(fileno(f))){
		fclose(f);
		return MOSQ_ERR_ERRNO;
	}
	fclose(f);
	file_lines++;
	return MOSQ_ERR_SUCCESS;
}

static bool signed_here(const char *body, size_t body_len, const char *sig)
{
	static const char hexdigits[] = "0123456789abcdef";
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int mac_len = 0;
	char hex[SIG_HEX];
	unsigned int i;
	if(!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)body, body_len, mac, &mac_len)
			|| mac_len * 2 != SIG_HEX){
		return false;
	}
	for(i = 0; i < mac_len; i++){
		hex[2 * i] = hexdigits[mac[i] >> 4];
		hex[2 * i + 1] = hexdigits[mac[i] & 0xf];
	}
	return CRYPTO_memcmp(hex, sig, SIG_HEX) == 0;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *pw = ed->password, *parts[5], *client_id, *username = ed->username;
	size_t lens[5], n = 0, name_len;
	const char *p, *dot;
	char name[PREFIX_LEN + 2 * MAX_ID + 2];
	long long expires;
	struct revoked *r;
	/* a name only devices with a token have: anyone else using it is refused, not deferred */
	int not_ours = (username && !strncmp(username, PREFIX, PREFIX_LEN)) ? MOSQ_ERR_AUTH : MOSQ_ERR_PLUGIN_DEFER;

	(void)event;
	(void)userdata;
	if(!pw || strncmp(pw, PREFIX, PREFIX_LEN)) return not_ours;
	for(p = pw; n < 5; n++){
		dot = strchr(p, '.');
		parts[n] = p;
		lens[n] = dot ? (size_t)(dot - p) : strlen(p);
		if(!dot){
			n++;
			break;
		}
		p = dot + 1;
	}
	if(n != 5 || strchr(parts[4], '.') || lens[4] != SIG_HEX || !valid_id(parts[1], lens[1])
			|| !valid_id(parts[2], lens[2]) || !parse_ms(parts[3], lens[3], &expires)
			|| !signed_here(pw, (size_t)(parts[4] - 1 - pw), parts[4])){
		return not_ours; /* not a token of this deployment */
	}
	client_id = mosquitto_client_id(ed->client);
	name_len = (size_t)(parts[3] - 1 - pw); /* "pg1.USER.DEVICE" */
	if(expires <= now_ms()){
		mosquitto_log_printf(MOSQ_LOG_INFO, "pigeon_auth: refused %s: token expired", client_id ? client_id : "?");
		return MOSQ_ERR_AUTH;
	}
	/* the username is the device id, or, checked again on a reload, the name given below */
	if(!client_id || !username || strlen(client_id) != lens[2] || strncmp(client_id, parts[2], lens[2])
			|| ((strlen(username) != lens[2] || strncmp(username, parts[2], lens[2]))
				&& (strlen(username) != name_len || strncmp(username, pw, name_len)))){
		mosquitto_log_printf(MOSQ_LOG_INFO, "pigeon_auth: refused %s: the token is another device's",
				client_id ? client_id : "?");
		return MOSQ_ERR_AUTH;
	}
	r = revoked_find(client_id);
	if(r && r->until > now_ms()){
		mosquitto_log_printf(MOSQ_LOG_INFO, "pigeon_auth: refused %s: device unlinked", client_id);
		return MOSQ_ERR_AUTH;
	}
	/* "pg1.USER.DEVICE": what the access checks read the client's user and device from */
	snprintf(name, sizeof(name), "%.*s", (int)name_len, pw);
	return strcmp(username, name) ? mosquitto_set_username(ed->client, name) : MOSQ_ERR_SUCCESS;
}

/* Is topic exactly "<head>/<user>" followed by tail ("" or "/…")? */
static bool topic_is(const char *topic, const char *head, const char *user, size_t user_len, const char *tail)
{
	size_t h = strlen(head);
	if(strncmp(topic, head, h) || topic[h] != '/') return false;
	topic += h + 1;
	if(strncmp(topic, user, user_len)) return false;
	return !strcmp(topic + user_len, tail);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *name = mosquitto_client_username(ed->client), *user, *dot;
	char device_tail[MAX_ID + 2];
	size_t user_len;

	(void)event;
	(void)userdata;
	if(!name || strncmp(name, PREFIX, PREFIX_LEN)) return MOSQ_ERR_PLUGIN_DEFER;
	user = name + PREFIX_LEN;
	dot = strchr(user, '.');
	if(!dot || strlen(dot + 1) > MAX_ID) return MOSQ_ERR_ACL_DENIED;
	user_len = (size_t)(dot - user);
	snprintf(device_tail, sizeof(device_tail), "/%s", dot + 1);
	switch(ed->access){
		case MOSQ_ACL_WRITE: /* publish: only up/{user}/{device} */
			return topic_is(ed->topic, "up", user, user_len, device_tail) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_SUBSCRIBE: /* down/{user}, down/{user}/{device}, down/{user}/v2 */
		case MOSQ_ACL_READ: /* and only what comes on those */
			if(topic_is(ed->topic, "down", user, user_len, "") || topic_is(ed->topic, "down", user, user_len, device_tail)
					|| topic_is(ed->topic, "down", user, user_len, "/v2")){
				return MOSQ_ERR_SUCCESS;
			}
			return MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_UNSUBSCRIBE:
			return MOSQ_ERR_SUCCESS; /* leaving a subscription */
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

static int run_command(char *line)
{
	char *verb = strtok(line, " "), *device = strtok(NULL, " "), *until = strtok(NULL, " "), *extra = strtok(NULL, " ");
	long long until_ms;
	if(!verb || !device || extra || !valid_id(device, strlen(device))) return MOSQ_ERR_INVAL;
	if(!strcmp(verb, "kick") && !until){
		mosquitto_kick_client_by_clientid(device, true);
		return MOSQ_ERR_SUCCESS;
	}
	if(!strcmp(verb, "revoke") && until && parse_ms(until, strlen(until), &until_ms)){
		int rc = revoked_keep(device, until_ms);
		if(rc == MOSQ_ERR_NOMEM) return rc;
		if(rc){ /* in force here, but lost if Mosquitto restarts: said loudly */
			mosquitto_log_printf(MOSQ_LOG_ERR, "pigeon_auth: cannot keep the revocation of %s in %s: %s",
					device, revoked_path, strerror(errno));
		}
		mosquitto_kick_client_by_clientid(device, false);
		return MOSQ_ERR_SUCCESS;
	}
	return MOSQ_ERR_INVAL;
}

static int on_control(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ed = event_data;
	char *text, *line, *save = NULL;

	(void)event;
	(void)userdata;
	if(ed->payloadlen == 0 || ed->payloadlen > 65536) return MOSQ_ERR_INVAL;
	text = malloc(ed->payloadlen + 1);
	if(!text) return MOSQ_ERR_NOMEM;
	memcpy(text, ed->payload, ed->payloadlen);
	text[ed->payloadlen] = '\0';
	for(line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)){
		int rc = run_command(line);
		if(rc) mosquitto_log_printf(MOSQ_LOG_WARNING, "pigeon_auth: command not carried out (error %d)", rc);
	}
	free(text);
	/* the others were carried out; an error returned here would make Mosquitto close the bridge's connection */
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int read_secret(const char *path)
{
	FILE *f = fopen(path, "rb");
	size_t n;
	if(!f) return MOSQ_ERR_ERRNO;
	n = fread(secret, 1, sizeof(secret), f);
	fclose(f);
	/* as the bridge reads it: surrounding whitespace is not part of the secret */
	while(n > 0 && (secret[n - 1] == '\n' || secret[n - 1] == '\r' || secret[n - 1] == ' ' || secret[n - 1] == '\t')) n--;
	if(n < 16 || n == sizeof(secret)) return MOSQ_ERR_INVAL;
	secret_len = n;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options, int option_count)
{
	const char *secret_file = NULL;
	int i, rc;

	(void)userdata;
	for(i = 0; i < option_count; i++){
		if(!strcasecmp(options[i].key, "secret_file")) secret_file = options[i].value;
		else if(!strcasecmp(options[i].key, "revoked_file")) revoked_path = strdup(options[i].value);
	}
	if(!secret_file || !revoked_path){
		mosquitto_log_printf(MOSQ_LOG_ERR, "pigeon_auth: plugin_opt_secret_file and plugin_opt_revoked_file are required");
		return MOSQ_ERR_INVAL;
	}
	if(read_secret(secret_file)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "pigeon_auth: %s must hold the deployment's secret (16 to %d bytes)",
				secret_file, MAX_SECRET - 1);
		return MOSQ_ERR_INVAL;
	}
	rc = revoked_load();
	if(rc){
		mosquitto_log_printf(MOSQ_LOG_ERR, "pigeon_auth: cannot read or rewrite %s: %s", revoked_path, strerror(errno));
		return rc;
	}
	plg_id = identifier;
	if((rc = mosquitto_callback_register(plg_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL))
			|| (rc = mosquitto_callback_register(plg_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL))
			|| (rc = mosquitto_callback_register(plg_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, NULL))){
		return rc;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "pigeon_auth: checking device tokens; %zu devices revoked", live);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	if(plg_id){
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		mosquitto_callback_unregister(plg_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
	}
	table_free();
	free(revoked_path);
	revoked_path = NULL;
	OPENSSL_cleanse(secret, sizeof(secret));
	return MOSQ_ERR_SUCCESS;
}
