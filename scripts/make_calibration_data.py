"""Regenerate calibration_data/ (run once, offline; the outputs are committed).

    python scripts/make_calibration_data.py --skimage-data DIR

Needs: pillow, numpy, Debian's espeak-ng and sox (speech), fonts-wqy-microhei (Chinese text on the
rendered screens), and DIR = the ``skimage/data`` folder of the scikit-image 0.26.0 wheel
(``pip download --no-deps scikit-image==0.26.0`` and unzip). See calibration_data/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "calibration_data"
FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"

# scikit-image sample photographs (public domain or CC0; see README.md for each).
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png",
          "hubble_deep_field.jpg", "page.png", "retina.jpg", "text.png"]

SPEECH = [
    ("en-us", "en_open_wechat", "Open WeChat and send hello to Mom."),
    ("en-us", "en_alarm", "Set an alarm for seven thirty tomorrow morning."),
    ("en-us", "en_search", "Search for coffee shops near me."),
    ("en-us", "en_settings", "Turn on Bluetooth in the settings."),
    ("en-us", "en_photo", "Take a photo and share it with Alice."),
    ("en-us", "en_music", "Play some relaxing music."),
    ("cmn", "zh_weixin", "打开微信，给妈妈发一条消息，说我晚上回家吃饭。"),
    ("cmn", "zh_taxi", "帮我叫一辆车去北京南站。"),
    ("cmn", "zh_alarm", "明天早上七点半叫我起床。"),
    ("cmn", "zh_weather", "今天上海的天气怎么样？"),
    ("cmn", "zh_taobao", "在淘宝上搜索蓝牙耳机，按价格从低到高排序。"),
    ("cmn", "zh_settings", "打开设置，把屏幕亮度调到最高。"),
]

PROMPTS = [
    "Open the Settings app and turn on Wi-Fi.",
    "Send a message to John on WhatsApp saying I will be late.",
    "Find the cheapest flight from Beijing to Shanghai next Friday.",
    "Book a table for two at an Italian restaurant tonight at 7 pm.",
    "Take a screenshot and share it to my email.",
    "Turn the volume down to 30 percent.",
    "Add milk, eggs and bread to my shopping list.",
    "Navigate to the nearest gas station.",
    "Reply to the latest email from my manager with 'Received, thanks'.",
    "What is on this screen? Describe the buttons I can tap.",
    "Scroll down and tap the 'Sign in' button.",
    "Open the camera, switch to video mode and start recording.",
    "Install the app called Notes from the app store.",
    "Set a reminder to call the dentist tomorrow at 10 am.",
    "Translate the text on the screen into Chinese.",
    "Order a large pepperoni pizza for delivery.",
    "Check my bank balance in the banking app.",
    "Turn on dark mode.",
    "打开微信，找到张三，发送“明天见”。",
    "在美团上点一份宫保鸡丁外卖，送到公司。",
    "帮我在高德地图上导航到最近的地铁站。",
    "打开支付宝，查看本月账单。",
    "把手机调成静音模式。",
    "在小红书上搜索成都旅游攻略，并收藏第一篇。",
    "打开设置，连接名为 Office 的无线网络。",
    "给李老师打电话。",
    "在淘宝购物车里选中所有商品并结算。",
    "截屏并发送到家人群。",
    "打开日历，添加下周一上午九点的会议。",
    "屏幕上有哪些按钮？请逐一说明。",
    "打开抖音，关注第一个推荐的账号。",
    "帮我预订明天下午三点从北京到天津的高铁票。",
    "把这张照片设为壁纸。",
    "打开网易云音乐，播放我喜欢的歌曲。",
    "Open Bilibili and search for a Python tutorial.",
    "用英文回复这封邮件：我已经收到附件了。",
]

SCREENS = [
    ("home", ["Phone", "Messages", "Camera", "Photos", "Settings", "Maps", "Mail", "Music", "微信", "支付宝",
              "淘宝", "抖音"]),
    ("chat", ["妈妈: 晚上回家吃饭吗？", "我: 好的，七点到", "Alice: See you at the cafe", "我: On my way!",
              "妈妈: 记得带伞"]),
    ("settings", ["Wi-Fi", "蓝牙 Bluetooth", "Display 显示", "Sound 声音", "Battery 电池", "Privacy 隐私",
                  "About phone 关于手机"]),
    ("shop", ["蓝牙耳机  ¥199", "Wireless Earbuds  $29.99", "充电宝 20000mAh  ¥99", "Phone case  $9.99",
              "数据线  ¥19"]),
    ("map", ["北京南站 Beijing South", "3.2 km · 12 min", "Start navigation 开始导航", "Nearby: 加油站, 地铁站"]),
    ("login", ["Sign in", "Email", "Password", "Forgot password?", "登录", "注册新账号"]),
]


def photos(src: Path) -> None:
    out = OUT / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        img = Image.open(src / name).convert("RGB")
        img.thumbnail((448, 448))
        img.save(out / (Path(name).stem + ".jpg"), quality=85)


def screens() -> None:
    """Phone screenshots at a real phone's native resolution (1080x2400, 20:9), as the phone agent
    sends them: the vision tower reads them at native resolution, so calibration must too."""
    out = OUT / "images"
    s = 3  # layout units -> pixels (the layout was drawn for a 360-wide screen)
    font = ImageFont.truetype(FONT, 22 * s)
    small = ImageFont.truetype(FONT, 16 * s)
    rng = random.Random(0)
    for name, items in SCREENS:
        w, h = 1080, 2400
        bg = (245, 245, 247) if name != "home" else (40 + rng.randrange(40), 80, 140)
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, w, 28 * s], fill=(20, 20, 20))
        d.text((10 * s, 5 * s), "9:41", font=small, fill="white")
        d.text((w - 70 * s, 5 * s), "5G 87%", font=small, fill="white")
        if name == "home":
            for i, label in enumerate(items):
                x, y = (24 + (i % 4) * 84) * s, (80 + (i // 4) * 110) * s
                color = tuple(rng.randrange(60, 230) for _ in range(3))
                d.rounded_rectangle([x, y, x + 60 * s, y + 60 * s], radius=14 * s, fill=color)
                d.text((x, y + 66 * s), label, font=small, fill="white")
        else:
            d.rectangle([0, 28 * s, w, 80 * s], fill=(255, 255, 255))
            d.text((16 * s, 40 * s), name.capitalize(), font=font, fill=(0, 0, 0))
            for i, label in enumerate(items):
                y = (100 + i * 76) * s
                d.rounded_rectangle([12 * s, y, w - 12 * s, y + 60 * s], radius=10 * s, fill=(255, 255, 255),
                                    outline=(220, 220, 220), width=s)
                d.text((28 * s, y + 17 * s), label, font=font, fill=(30, 30, 30))
        img.save(out / f"screen_{name}.png", optimize=True)


def speech() -> None:
    out = OUT / "audio"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for voice, name, text in SPEECH:
            raw = Path(tmp) / f"{name}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True)
            subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out / f"{name}.wav")],
                           check=True)
    (out / "transcripts.jsonl").write_text(
        "".join(json.dumps({"file": f"{n}.wav", "voice": v, "text": t}, ensure_ascii=False) + "\n"
                for v, n, t in SPEECH), encoding="utf-8")


def prompts() -> None:
    lines = [json.dumps({"lang": "zh" if any("\u4e00" <= c <= "\u9fff" for c in p) else "en", "prompt": p},
                        ensure_ascii=False) for p in PROMPTS]
    (OUT / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skimage-data", type=Path, required=True)
    args = parser.parse_args()
    photos(args.skimage_data)
    screens()
    speech()
    prompts()


if __name__ == "__main__":
    main()
