"""The samples of one shard file: read from its tar (keys grouped as webdataset groups them) and decoded
to the uint8 image training takes, on the CPU or, as encoded bytes, on the device."""

from __future__ import annotations

import io
import tarfile

import torch
import torch.nn.functional as F

from ..errors import UserError
from .images import pil_to_uint8

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}  # no sniffing through every format
READ = (*IMAGE_KEYS, "cls", "txt")  # what training reads of a sample; its .json and others are skipped over
_ZERO = bytes(512)
DAMAGED = (tarfile.TarError, OSError, EOFError, ValueError)  # what reading a corrupt or truncated shard raises
DRAFT = True  # Pillow's JPEG draft mode for images stored larger than they train: docs/benchmarks.md
try:  # faster than Pillow where installed (docs/benchmarks.md); not a dependency
    import simplejpeg as JPEG
except ImportError:
    JPEG = None


def webdataset():
    try:
        import webdataset as wds
    except ImportError:
        raise UserError("shards need the webdataset package: pip install 'contrastive_cli[shards]' "
                        "(or pip install webdataset)") from None
    return wds


def read_samples(path: str, wanted: tuple[str, ...] | None = READ):
    """(key, {extension: bytes}) of every sample of one shard, in order, with the members whose
    extension is in `wanted` (None: all). Members are grouped by key as webdataset groups them (the
    name up to the first dot of its file name). A plain tar (ustar, pax or GNU long names: what
    webdataset, tarfile and GNU tar write) is walked header by header, seeking past what is not read:
    15x faster a sample than webdataset's reader, which takes any other (a compressed .tar.gz).
    A corrupt or truncated tar raises one of DAMAGED after the samples before the damage."""
    with open(path, "rb", buffering=1 << 20) as f:
        if f.peek(262)[257:262] != b"ustar":  # not a plain tar: the library's reader
            f.close()
            wds = webdataset()
            for sample in wds.tarfile_samples([{"url": path}]):
                yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")
                                          and (wanted is None or k in wanted)}
            return
        key, fields, long_name = None, {}, None
        while True:
            header = f.read(512)
            if len(header) < 512:
                raise EOFError(f"{path}: truncated (no end-of-archive blocks)")
            if header == _ZERO:
                break
            # no checksum (a tenth of the reading): a damaged header fails below, in the octal size, the
            # name's UTF-8 or the end of the file, and the shard is skipped from there as a truncated one
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            padded, kind = (size + 511) & ~511, header[156:157]
            name = long_name or _header_name(header)
            long_name = None
            if kind in (b"x", b"L"):  # the next member's long name: pax record path=..., or GNU's
                body = f.read(padded)[:size]
                long_name = _pax_path(body) if kind == b"x" else body.rstrip(b"\0").decode("utf-8")
                continue
            base = name.rsplit("/", 1)[-1]
            if kind not in (b"0", b"\0", b"7") or "." not in base or base.startswith("__"):
                f.seek(padded, 1)
                continue
            k, ext = name[: len(name) - len(base) + base.index(".")], base[base.index(".") + 1 :].lower()
            if k != key:
                if fields:
                    yield key, fields
                key, fields = k, {}
            if wanted is None or ext in wanted:
                data = f.read(size)
                if len(data) < size:
                    raise EOFError(f"{path}: truncated inside {name}")
                fields[ext] = data
                f.seek(padded - size, 1)
            else:
                f.seek(padded, 1)
        if fields:
            yield key, fields


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    if header[345] and header[257:262] == b"ustar":  # ustar's prefix of a long name
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        return f"{prefix}/{name}"
    return name


def _pax_path(body: bytes) -> str | None:
    for record in body.decode("utf-8").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def shard_index(path: str) -> list[tuple[str, int]]:
    """(key, label or -1) of every sample of a shard that has an image, in order (cl-embed's rows)."""
    try:
        return [(key, int(f["cls"]) if "cls" in f else -1)
                for key, f in read_samples(path, (*IMAGE_KEYS, "cls")) if any(k in f for k in IMAGE_KEYS)]
    except DAMAGED as e:
        raise UserError(f"{path}: not a readable tar shard ({e})") from None


def shard_image(path: str, key: str) -> bytes:
    """The encoded image of one sample of a shard (a picture of an index row)."""
    for k, fields in read_samples(path, IMAGE_KEYS):
        image = next((fields[e] for e in IMAGE_KEYS if e in fields), None)
        if k == key and image is not None:
            return image
    raise UserError(f"{path}: has no sample {key}")


def parse(fields: dict, size: int, channels: int, encoded: bool):
    """(image, label, caption) of a sample: the image decoded to uint8 (channels, size, size), or, with
    `encoded`, its bytes as a uint8 tensor for the device to decode; None when it has no readable image."""
    ext = next((k for k in IMAGE_KEYS if k in fields), None)
    if ext is None:
        return None
    label = int(fields["cls"]) if "cls" in fields else -1
    caption = fields["txt"].decode("utf-8") if "txt" in fields else None
    if encoded:
        return torch.frombuffer(bytearray(fields[ext]), dtype=torch.uint8), label, caption
    from PIL import Image

    if ext in ("jpg", "jpeg") and JPEG is not None:
        try:  # libjpeg-turbo without Pillow's overhead, scaled in the decoder as the draft mode does
            arr = JPEG.decode_jpeg(fields[ext], colorspace="GRAY" if channels == 1 else "RGB", min_height=size,
                                   min_width=size)
            return pil_to_uint8(Image.fromarray(arr[..., 0] if channels == 1 else arr), size, channels), label, caption
        except Exception:  # a JPEG it does not take (CMYK, progressive oddities): Pillow's turn
            pass
    if ext == "png" and _png_as_is(fields[ext], size, channels):
        try:  # already at the size, 8-bit, in the channels wanted: the pixels as stored, without Pillow's overhead
            from torchvision.io import ImageReadMode, decode_png

            data = torch.frombuffer(bytearray(fields[ext]), dtype=torch.uint8)
            return decode_png(data, ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB), label, caption
        except Exception:  # a damaged file: Pillow decides
            pass
    for formats in ((_PIL_FORMAT[ext],), None):  # the format its name says (no sniffing), else any
        try:
            with Image.open(io.BytesIO(fields[ext]), formats=formats) as img:
                if DRAFT and img.format == "JPEG":  # scaled by 1/2, 1/4 or 1/8 in the decoder, staying >= size
                    img.draft("L" if channels == 1 else "RGB", (size, size))
                return pil_to_uint8(img, size, channels), label, caption
        except Exception:  # Pillow raises OSError, ValueError, SyntaxError ... on a damaged image
            continue
    return None


def _png_as_is(data: bytes, size: int, channels: int) -> bool:
    """Whether a PNG's IHDR says size x size, 8 bits, grey (channels 1) or RGB (channels 3): decoded, it
    is the uint8 image training wants, the same pixels Pillow would give."""
    return (len(data) > 26 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == (0 if channels == 1 else 2)
            and int.from_bytes(data[16:20], "big") == size and int.from_bytes(data[20:24], "big") == size)


def decode_on(device: torch.device, encoded: list[torch.Tensor], size: int, channels: int) -> torch.Tensor:
    """A batch of encoded images decoded on `device` (dataset.decode=gpu: nvJPEG through torchvision),
    resized to (size, size) there; uint8 (B, channels, size, size)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = decode_jpeg(encoded, mode=mode, device=device)
    out = torch.empty(len(images), channels, size, size, dtype=torch.uint8, device=device)
    for i, img in enumerate(images):
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255)
        out[i] = img
    return out
