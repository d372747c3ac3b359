"""Privacy: face blurring, metadata stripping with orientation, encryption at rest."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps
from skimage import data as skdata

from retail_cv.core import ConfigError, DataError, IntegrityError, RetailCVError, sha256_bytes
from retail_cv.data.privacy import (FaceDetector, decrypt_object, encrypt_object, exif_orientation, generate_key,
                                    is_metadata_free, key_id, keyed_object_id, load_key, sanitise_image, transform_box)

FACE = (slice(80, 150), slice(190, 255))  # eyes to mouth of the astronaut, read off the photo by eye
FAR = (slice(380, 512), slice(380, 512))  # bottom-right corner: her suit and the flag, far from the face


def encode(arr_or_im, fmt='PNG', **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO(); im.save(buf, fmt, **kw); return buf.getvalue()


def sharpness(grey: np.ndarray) -> float:
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F).var())


@pytest.fixture(scope='module')
def astronaut() -> np.ndarray:
    return skdata.astronaut()


def test_detector_finds_the_astronaut_face(astronaut):
    faces = FaceDetector().detect(astronaut)
    assert any(x <= 223 <= x + w and y <= 113 <= y + h for x, y, w, h in faces), faces
    assert all(w * h < 0.1 * 512 * 512 for _, _, w, h in faces)  # faces, not the whole photo


@pytest.mark.parametrize('method', ['blur', 'pixelate'])
def test_face_blurred_rest_untouched(astronaut, method):
    res = sanitise_image(encode(astronaut), anonymise=True, face_method=method)
    assert res.changed and res.faces
    out = np.asarray(Image.open(io.BytesIO(res.data)).convert('RGB'))
    before, after = astronaut.astype(float), out.astype(float)
    assert np.abs(after[FACE] - before[FACE]).mean() > 15           # the face changed a lot
    if method == 'blur':   # and lost its detail
        assert sharpness(out[FACE].mean(-1)) < 0.1 * sharpness(astronaut[FACE].mean(-1))
    else:                  # a few flat blocks instead of thousands of colours
        colours = lambda a: len(np.unique(a.reshape(-1, 3), axis=0))
        assert colours(out[FACE]) <= 40 < 2000 < colours(astronaut[FACE])
    np.testing.assert_array_equal(out[FAR], astronaut[FAR])          # PNG is lossless: far pixels identical
    changed_rows, changed_cols = np.nonzero(np.any(out != astronaut, axis=-1))
    assert changed_rows.max() < 300 and changed_cols.max() < 360     # nothing changed outside the face area


def test_face_blur_on_rotated_photo_keeps_orientation_when_not_stripping(astronaut):
    ex = Image.Exif(); ex[ExifTags.Base.Orientation] = 6
    stored = Image.fromarray(astronaut).transpose(Image.Transpose.ROTATE_90)  # pixels on their side, tag says rotate back
    res = sanitise_image(encode(stored, 'PNG', exif=ex), strip_metadata=False, anonymise=True)
    out = Image.open(io.BytesIO(res.data))
    assert exif_orientation(out) == 6 and out.size == stored.size
    upright = np.asarray(ImageOps.exif_transpose(out).convert('RGB'))
    assert np.abs(upright[FACE].astype(float) - astronaut[FACE]).mean() > 15
    np.testing.assert_array_equal(upright[FAR], astronaut[FAR])


def test_exif_gps_stripped_and_orientation_applied():
    px = np.full((40, 60, 3), 255, np.uint8); px[2:12, 4:14] = (255, 0, 0)  # red square at the stored top-left
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = 6; ex[ExifTags.Base.Make] = 'ACME-CAM'; ex[ExifTags.Base.BodySerialNumber] = 'SN-778899'
    ex[ExifTags.IFD.GPSInfo] = {1: 'N', 2: (52.0, 31.0, 12.0), 3: 'E', 4: (13.0, 24.0, 0.0)}
    src = encode(px, 'JPEG', exif=ex, comment=b'store 42 aisle 7', quality=95)
    assert Image.open(io.BytesIO(src)).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the input really has GPS
    res = sanitise_image(src)
    out = Image.open(io.BytesIO(res.data))
    assert out.size == (40, 60) and (res.width, res.height) == (40, 60) and res.orientation == 6
    assert dict(out.getexif()) == {} and not out.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert not {'exif', 'comment', 'xmp'} & set(out.info)
    for needle in (b'Exif', b'ACME-CAM', b'SN-778899', b'aisle 7'): assert needle not in res.data
    assert {'exif', 'gps', 'comment'} <= set(res.removed)
    rgb = np.asarray(out).astype(int)
    ys, xs = np.nonzero(rgb[..., 0] - rgb[..., 1] > 100)
    found = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    np.testing.assert_allclose(found, transform_box((4, 2, 10, 10), 6, 60, 40), atol=1.5)
    assert found[0] > 20  # orientation 6 puts the stored top-left at the right: really rotated


def test_png_text_and_xmp_stripped():
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo(); info.add_text('Author', 'Jane Doe'); info.add_itxt('XML:com.adobe.xmp', '<x:xmpmeta>gps</x:xmpmeta>')
    src = encode(np.zeros((8, 8, 3), np.uint8), 'PNG', pnginfo=info)
    assert not is_metadata_free(src)
    res = sanitise_image(src)
    assert b'Jane Doe' not in res.data and b'xmpmeta' not in res.data and is_metadata_free(res.data)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(res.data))), np.zeros((8, 8, 3), np.uint8))


def test_clean_file_kept_byte_for_byte():
    src = encode(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3), 'JPEG', quality=90)
    assert is_metadata_free(src)
    res = sanitise_image(src)
    assert res.data == src and not res.changed


@pytest.mark.parametrize('orientation', range(1, 9))
def test_transform_box_matches_pillow(orientation):
    stored = np.zeros((40, 60), np.uint8); stored[5:15, 10:30] = 255
    ex = Image.Exif(); ex[ExifTags.Base.Orientation] = orientation
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, 'PNG', exif=ex)))))
    ys, xs = np.nonzero(shown > 127)
    assert transform_box((10, 5, 20, 10), orientation, 60, 40) == (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


def test_unreadable_image_named():
    with pytest.raises(DataError, match='shelf/7.jpg: not a readable image'):
        sanitise_image(b'\xff\xd8 definitely not a jpeg', source='shelf/7.jpg')


def test_key_file_roundtrip_and_permissions(tmp_path):
    kf = generate_key(tmp_path/'k'/'data.key')
    assert kf.stat().st_mode & 0o777 == 0o600
    key = load_key(kf)
    assert len(key) == 32 and load_key(str(kf)) == key
    import base64
    assert load_key(env={'RETAIL_CV_DATA_KEY': base64.b64encode(key).decode()}) == key
    assert load_key(env={'RETAIL_CV_DATA_KEY': key.hex()}) == key
    with pytest.raises(ConfigError, match='already exists'): generate_key(kf)
    with pytest.raises(ConfigError, match='32 bytes'): load_key(b'short')


def test_wrong_key_and_tampering_are_clear_errors(tmp_path):
    k1, k2 = load_key(generate_key(tmp_path/'a.key')), load_key(generate_key(tmp_path/'b.key'))
    msg = b'plaintext of a shelf photo' * 10
    sha = sha256_bytes(msg)
    blob = encrypt_object(msg, k1, sha)
    assert msg not in blob and blob != encrypt_object(msg, k1, sha)  # random nonce per object
    assert decrypt_object(blob, k1, sha) == msg
    with pytest.raises(IntegrityError, match=f'wrong key or corrupted object {sha}'): decrypt_object(blob, k2, sha)
    bad = bytearray(blob); bad[30] ^= 0x01
    with pytest.raises(RetailCVError, match='wrong key or corrupted object'): decrypt_object(bytes(bad), k1, sha)
    other = sha256_bytes(b'another object')
    with pytest.raises(IntegrityError, match='wrong key or corrupted object'): decrypt_object(blob, k1, other)  # AAD binds the hash
    assert key_id(k1) != key_id(k2) and keyed_object_id(k1, sha) != keyed_object_id(k2, sha) != sha
